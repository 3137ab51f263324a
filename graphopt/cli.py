"""The `graphopt` command line.

    graphopt demo [--layers N] [--seq N] [--pipeline NAME]

Exit codes: 0 success, 1 a graphopt error (message printed, no traceback unless --debug),
2 bad usage.

Example:
    $ graphopt demo --layers 2
"""

from __future__ import annotations

import argparse
import sys

from graphopt.errors import GraphoptError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Compiler-style graph optimizer for JAX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="optimize a bundled Flax transformer and compare it with jax.jit")
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--seq", type=int, default=128)
    demo.add_argument("--pipeline", default="default")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from graphopt.demo import DemoConfig, run_demo

            run_demo(DemoConfig(layers=args.layers, seq=args.seq), pipeline=args.pipeline)
        return 0
    except GraphoptError as err:
        if args.debug:
            raise
        print(f"graphopt: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
