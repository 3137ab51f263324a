"""The `graphopt` command line: show, optimize, diff, export, compile and bisect a model; passes; demo.

    graphopt show     MODEL [-i SPEC ...] [--pipeline NAME | --passes LIST] [--summary | --dot] [-o FILE]
    graphopt optimize MODEL [-i SPEC ...] [--pipeline NAME | --passes LIST] [--report] [--summary] [--verify]
                      [--html FILE]
    graphopt diff     MODEL [-i SPEC ...] [--pipeline NAME | --passes LIST]
    graphopt export   MODEL [-i SPEC ...] [--pipeline NAME | --passes LIST] --platforms tpu,cuda,cpu -o FILE
    graphopt compile  MODEL [-i SPEC ...] [--pipeline NAME | --passes LIST] --target tpu:v5e:2x2 [--mesh DxM]
                      [--compare] [-o FOLDER]
    graphopt bisect   MODEL [-i SPEC ...] [--pipeline NAME | --passes LIST] [--random-inputs N]
    graphopt passes
    graphopt bench    [--quick] [--models ...] [--pipelines ...] [--results]   (from a source checkout)
    graphopt demo     [--layers N] [--seq N] [--pipeline NAME]

MODEL is `module:function` or `path/to/file.py:function`, with one `--input DTYPE[dims]` per
positional argument (`-i f32[2,128]`, `-i i32[2,16]`); without `--input`, the function is a
factory returning `(fn, example_args)` (how a Flax model brings its variables). See
`graphopt.model_spec`. `--passes` takes pass specs separated by commas:
`--passes "canonicalize, quantize(int8, group=128), dce"`.

Exit codes (scripts may rely on them): 0 success; 1 a graphopt error (unknown pass or pipeline,
a model that cannot be traced, a failing pass, an exception in the model's own code); 2 a usage
error (bad option, model or module not found, bad input spec); 3 `bisect` found a pass that
changes the results; 130 interrupted. Errors are printed without a traceback unless `--debug`.

Example:
    >>> main(["show", "graphopt.demo:no_such_model", "-i", "f32[2]"])  # the message goes to stderr
    2
    >>> main(["show", "jax.numpy:tanh", "-i", "f32[3]", "--no-source"])
    graph tanh(%x: f32[3]) {
      %0 = tanh %x : f32[3]
      return %0
    }
    0
"""

from __future__ import annotations

import argparse
import sys
import warnings

from graphopt.errors import GraphoptError

OK, ERROR, USAGE, BISECT_FOUND, INTERRUPTED = 0, 1, 2, 3, 130

_EXIT_CODES = """\
exit codes:
  0 success; 1 graphopt error (unknown pass, trace failure, failing pass, exception in the model's
  code); 2 usage error (bad option, model not found, bad input spec); 3 bisect found a pass that
  changes the results; 130 interrupted. Add --debug for tracebacks.
"""

_EPILOG = """\
model:
  MODEL is module:function or path/to/file.py:function (dotted attributes allowed: file.py:Net.apply).
  Give one --input DTYPE[d0,d1,...] per positional argument (f32[2,128], i32[2,16], bf16[8], f32[]);
  the arrays are random (floats N(0,1), integers in [0,8)) and reproducible (--seed). Without
  --input, the function is a factory: called with no arguments it returns (fn, example_args), e.g.

      def make():                      # graphopt show model.py:make --pipeline default
          model = Block()
          x = jnp.ones((2, 16, 64))
          return model.apply, (model.init(jax.random.key(0), x), x)

  Weights: argument 0 of a linen apply, the state of an nnx or Equinox module; --params-argnums for
  a plain function that takes its weights as arguments. Passes the model's module registers
  (@graphopt.register_pass) can be named in --passes.

""" + _EXIT_CODES


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphopt", formatter_class=_Formatter, epilog=_EPILOG,
        description="Compiler-style graph optimizer for JAX models: inspect, optimize and export them.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = _model_options()

    def command(name, help, parents, run, epilog=_EPILOG):
        sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                  parents=parents, formatter_class=_Formatter, epilog=epilog)
        sub.set_defaults(run=run, parser=sub)
        return sub

    show = command("show", "print a model's graph (after a pipeline, if one is given)",
                   [model, _pipeline_options("none")], _show)
    view = show.add_mutually_exclusive_group()
    view.add_argument("--summary", action="store_true", help="a table of op counts, parameters and FLOPs")
    view.add_argument("--dot", action="store_true", help="Graphviz DOT text (render: dot -Tsvg FILE)")
    _output_options(show)

    optimize = command("optimize", "run a pipeline on a model and print the optimized graph",
                       [model, _pipeline_options("default")], _optimize)
    optimize.add_argument("--report", action="store_true", help="also print what each pass did (nodes, "
                          "FLOPs, bytes, time, rules fired)")
    optimize.add_argument("--summary", action="store_true", help="print the summary table, not the listing")
    optimize.add_argument("--verify", action="store_true", help="validate every pass on the example and "
                          "random inputs; a pass that changes the results is reverted, with a warning")
    optimize.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report: the graph "
                          "(search, fold modules, node details), the per-pass table, what changed")
    _output_options(optimize)

    diff = command("diff", "show what a pipeline changes in a model, by module path and by pass",
                   [model, _pipeline_options("default")], _diff)
    diff.add_argument("--no-source", action="store_true", help="leave out source lines")

    export = command("export", "serialize the optimized model with jax.export for some platforms",
                     [model, _pipeline_options("default")], _export)
    export.add_argument("--platforms", default="tpu,cuda,cpu", metavar="LIST",
                        help="comma-separated: tpu, cuda, rocm, cpu (default: tpu,cuda,cpu)")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the artifact")

    compile_ = command("compile", "compile the optimized model ahead of time for cpu, cuda or a TPU "
                       "topology (no TPU needed) and print XLA's cost and memory analysis",
                       [model, _pipeline_options("default")], _compile)
    compile_.add_argument("--target", default="cpu", metavar="TARGET",
                          help="cpu, cuda, tpu, or tpu:CHIP:SHAPE such as tpu:v5e:2x2, tpu:v4:2x2x1 (a TPU "
                          "topology compiles with libtpu's compile-only devices: pip install 'graphopt[tpu]')")
    compile_.add_argument("--mesh", metavar="DxM", help="shard the model over a data x model mesh of the "
                          "target's devices (graphopt.shard: Megatron tensor parallelism over model, batch "
                          "over data), e.g. --mesh 1x4; the analyses are then per device")
    compile_.add_argument("--compare", action="store_true", help="also compile the unoptimized model "
                          "(pipeline none) and print both side by side")
    compile_.add_argument("-o", "--output", metavar="FOLDER", help="save the executable, its StableHLO, "
                          "HLO and analyses (program.json) into FOLDER")

    bisect = command("bisect", "validate every pass of a pipeline and name the first that changes the "
                     "results (exit code 3 when one does)", [model, _pipeline_options("default")], _bisect)
    bisect.add_argument("--random-inputs", type=int, default=2, metavar="N",
                        help="random input sets besides the example inputs (default: 2)")

    command("passes", "list the registered passes and the named pipelines", [_debug_option()], _passes,
            _EXIT_CODES)

    bench = commands.add_parser(
        "bench", help="run the benchmark suite (benchmarks/run.py) from a source checkout; "
        "`graphopt bench -- --help` lists its options", add_help=False, prefix_chars="\0")
    bench.add_argument("options", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench, parser=bench)

    demo = command("demo", "optimize a bundled Flax transformer and compare it with jax.jit",
                   [_debug_option()], _demo, _EXIT_CODES)
    demo.add_argument("--layers", type=int, default=4, help="transformer blocks (default: 4)")
    demo.add_argument("--seq", type=int, default=128, help="sequence length (default: 128)")
    demo.add_argument("--pipeline", default="default", help="pipeline name (default: default)")
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, --version (0) and argparse's usage errors (2)
        return exit.code if isinstance(exit.code, int) else USAGE
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _warning_printer(args.parser.prog)
            return args.run(args) or OK
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # `graphopt show ... | head`: the reader left; say nothing more
        _silence_stdout()
        return ERROR
    except Exception as err:
        from graphopt.model_spec import SpecError

        if debug:
            raise
        code = USAGE if isinstance(err, SpecError) else ERROR
        if code == USAGE:
            args.parser.print_usage(sys.stderr)
        message = str(err) if isinstance(err, GraphoptError) else f"{type(err).__name__}: {err}"
        hint = "" if isinstance(err, GraphoptError) else "\n(run with --debug for the traceback)"
        print(f"{args.parser.prog}: error: {message}{hint}", file=sys.stderr)
        return code


# --- options -------------------------------------------------------------------------------------

def _debug_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `graphopt --debug show ...` and `graphopt show ... --debug` both work
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    return parent


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, parents=[_debug_option()])
    parent.add_argument("model", metavar="MODEL", help="module:function or path/to/file.py:function")
    parent.add_argument("-i", "--input", dest="inputs", action="append", default=[], metavar="SPEC",
                        help="an example argument, DTYPE[d0,d1,...]: f32[2,128], i32[2,16]; once per "
                        "positional argument (none: MODEL is a factory returning (fn, example_args))")
    parent.add_argument("--params-argnums", type=_int_list, default=None, metavar="N[,N]",
                        help="positional arguments that hold weights (default: the framework's)")
    parent.add_argument("--seed", type=int, default=0, help="seed of the random example arrays (default: 0)")
    return parent


def _pipeline_options(default: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument("--pipeline", metavar="NAME", default=default,
                       help=f"a named pipeline (see `graphopt passes`; default: {default})")
    group.add_argument("--passes", metavar="LIST", help="pass specs separated by commas, e.g. "
                       "\"canonicalize, fold_constants, dce\"")
    parent.add_argument("--disable", action="append", default=[], metavar="PASS",
                        help="leave this pass out of the pipeline (repeatable)")
    return parent


def _output_options(sub) -> None:
    sub.add_argument("--decompositions", action="store_true", help="also show the nodes each composite op "
                     "(layer_norm, attention, ...) stands for")
    sub.add_argument("--no-source", action="store_true", help="leave out module paths and source lines")
    sub.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graphopt")
    except PackageNotFoundError:
        return "unknown"


# --- commands ------------------------------------------------------------------------------------

def _show(args) -> int:
    graph, report = _load_and_run(args)
    if args.summary:
        text = str(graph.summary())
    elif args.dot:
        from graphopt.dot import to_dot

        text = to_dot(graph, show_source=not args.no_source, decompositions=args.decompositions)
    else:
        from graphopt.show import format_graph

        text = format_graph(graph, show_source=not args.no_source, decompositions=args.decompositions)
    _write(args.output, text)
    return OK


def _optimize(args) -> int:
    model, pipeline = _model_and_pipeline(args)
    before = _trace(model, args)
    result = _run(before.clone()[0] if args.html else before, pipeline, args, args.verify, model)
    graph, report = result.graph, result.report
    from graphopt.show import format_graph

    if args.html:
        from graphopt.html_report import write_html_report

        write_html_report(args.html, before, graph, report, decompositions=args.decompositions)

    parts = [str(graph.summary()) if args.summary else
             format_graph(graph, show_source=not args.no_source, decompositions=args.decompositions)]
    if args.report:
        parts.append(str(report))
    _write(args.output, "\n\n".join(parts))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return OK


def _diff(args) -> int:
    from graphopt.diff import diff

    model, pipeline = _model_and_pipeline(args)
    before = _trace(model, args)
    after = _run(before.clone()[0], pipeline, args).graph
    print(diff(before, after).format(show_source=not args.no_source))
    return OK


def _export(args) -> int:
    from graphopt.lowering.export import export

    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    unknown = sorted(set(platforms) - {"tpu", "cuda", "rocm", "cpu"})
    if unknown or not platforms:
        from graphopt.model_spec import SpecError

        raise SpecError(f"unknown platform(s) {', '.join(unknown) or '(none given)'} in --platforms "
                        f"{args.platforms!r}; choose from tpu, cuda, rocm, cpu")
    graph, _ = _load_and_run(args)
    blob = export(graph, platforms=platforms)
    with open(args.output, "wb") as file:
        file.write(blob)
    print(f"wrote {args.output}: {len(blob):,} bytes for {', '.join(platforms)} "
          f"({graph.name}, pipeline {_pipeline_name(args)})")
    if graph.prep is not None:
        print("note: the artifact takes the optimized graph's parameters (a pass precomputed work on the "
              "weights): compute them with graphopt.prepare(graph, *args), or export with "
              "--disable fold_params to keep the model's own arguments")
    print(f"load it with graphopt.deserialize(open({args.output!r}, 'rb').read()).call(*args)")
    return OK


def _compile(args) -> int:
    from graphopt.lowering.compile import compile, for_backend
    from graphopt.lowering.target import parse_target
    from graphopt.model_spec import SpecError

    try:
        target = parse_target(args.target)
    except ValueError as e:
        raise SpecError(f"--target: {e}") from e
    model, pipeline = _model_and_pipeline(args)
    programs = {}
    name = args.passes or args.pipeline
    if args.mesh:  # graphopt.shard traces and runs the pipeline itself; --disable applies
        from graphopt.pipeline import resolve

        kept = [spec for _, spec in resolve(pipeline, args.disable)]
        for label, spec in ([("none", "none")] if args.compare else []) + [(name, kept)]:
            programs[label] = compile(model.fn, *model.args, target=target, pipeline=spec, mesh=args.mesh,
                                      params_argnums=args.params_argnums)
    else:
        graph = _trace(model, args)  # once: the unoptimized program compiles a copy
        if args.compare:
            programs["none"] = compile(graph.clone()[0], target=target)
        # Kernels chosen for the target, as graphopt.compile does; --disable applies.
        programs[name] = compile(_run(graph, for_backend(pipeline, target.platform), args).graph, target=target)
    program = programs[name]
    if args.compare:
        from graphopt.lowering.compile import comparison_table

        print(comparison_table(programs))
    else:
        print(program.summary())
    if args.output:
        folder = program.save(args.output)
        print(f"wrote {folder}: executable.bin ({(folder / 'executable.bin').stat().st_size:,} bytes), "
              "module.stablehlo.mlir, module.hlo.txt, program.json")
    return OK


def _bisect(args) -> int:
    from graphopt.validate import bisect

    model, pipeline = _model_and_pipeline(args)
    result = bisect(model.fn, *model.args, pipeline=pipeline, params_argnums=args.params_argnums,
                    disable=args.disable, random_inputs=args.random_inputs, seed=args.seed)
    print(result.report)
    return BISECT_FOUND if result.pass_name is not None else OK


def _passes(args) -> int:
    from graphopt.pipeline import PASSES, PIPELINES, _load_builtin_passes

    _load_builtin_passes()
    width = max(map(len, [*PASSES, *PIPELINES]))
    print("passes:")
    for name, info in sorted(PASSES.items()):
        print(f"  {name:<{width}}  {str(info.contract):<20}  {info.description}")
    print("pipelines:")
    seen: dict[tuple, str] = {}
    for name, names in PIPELINES.items():
        same = f"(= {seen[names]}) " if names in seen else ""
        seen.setdefault(names, name)
        print(f"  {name:<{width}}  {same}{', '.join(names) or '(no passes)'}")
    return OK


def _bench(args) -> int:
    """Run benchmarks/run.py's main with the remaining options; benchmarks/ is not installed, so
    it is looked for in the checkout graphopt runs from, then in the working directory."""
    import importlib.util
    import pathlib

    from graphopt.model_spec import SpecError

    options = [o for o in args.options if o != "--"]
    here = pathlib.Path(__file__).resolve().parent.parent
    for root in (here, pathlib.Path.cwd()):
        script = root / "benchmarks" / "run.py"
        if script.is_file():
            break
    else:
        raise SpecError("graphopt bench runs the benchmark suite of a source checkout (benchmarks/ is not "
                        "installed with the package): run it in a clone of the repository")
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location("graphopt_benchmarks_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    program, sys.argv[0] = sys.argv[0], "graphopt bench"  # its usage lines name this command
    try:
        return module.main(options)
    except SystemExit as exit:  # its --help (0) and usage errors (2)
        return exit.code if isinstance(exit.code, int) else USAGE
    finally:
        sys.argv[0] = program


def _demo(args) -> int:
    from graphopt.demo import DemoConfig, run_demo

    run_demo(DemoConfig(layers=args.layers, seq=args.seq), pipeline=args.pipeline)
    return OK


# --- helpers -------------------------------------------------------------------------------------

def _model_and_pipeline(args):
    """The model, and its pipeline resolved before tracing (an unknown pass fails fast). The model
    is loaded first: its module may register passes of its own."""
    from graphopt.model_spec import SpecError, load_model
    from graphopt.pipeline import _split_args, resolve

    if args.passes is not None:
        pipeline = _split_args(args.passes)
        if not pipeline:
            raise SpecError("--passes is empty; give pass names separated by commas")
    else:
        pipeline = args.pipeline
    model = load_model(args.model, args.inputs, args.seed)
    resolve(pipeline, args.disable)
    return model, pipeline


def _trace(model, args):
    from graphopt.trace import trace

    return trace(model.fn, *model.args, params_argnums=args.params_argnums)


def _run(graph, pipeline, args, verify: bool = False, model=None):
    from graphopt.pipeline import run_pipeline

    validator = None
    if verify:
        from graphopt.frameworks import adapt
        from graphopt.validate import Validator

        validator = Validator([adapt(model.fn, model.args, args.params_argnums).args])
    return run_pipeline(graph, pipeline, disable=args.disable, validator=validator)


def _load_and_run(args, verify: bool = False):
    model, pipeline = _model_and_pipeline(args)
    result = _run(_trace(model, args), pipeline, args, verify, model)
    return result.graph, result.report


def _warning_printer(prog: str):
    """graphopt's warnings as one message each, without the file and line of the warning call."""
    from graphopt.errors import GraphoptWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, GraphoptWarning):
            return default(message, category, filename, lineno, file, line)
        print(f"{prog}: warning: {message}", file=sys.stderr)

    return show


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _pipeline_name(args) -> str:
    return repr(args.passes) if args.passes is not None else repr(args.pipeline)


def _write(path: str | None, text: str) -> None:
    if path is None:
        print(text)
        return
    with open(path, "w", encoding="utf-8") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
