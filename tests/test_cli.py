"""The `graphopt` command line: every subcommand, happy paths and bad input, with exact exit codes."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.cli import BISECT_FOUND, ERROR, OK, USAGE, main
from graphopt.lowering.target import libtpu_available
from graphopt.pipeline import PASSES

PLAIN = """
import jax.numpy as jnp

def f(x, w):
    return jnp.tanh(x @ w) * 2.0

def mismatched(x):
    return x @ jnp.ones((5, 5))
"""

BLOCK = """
import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(x)
        h = nn.Dense(32, name="up")(h)
        return x + nn.Dense(16, name="down")(nn.gelu(h))


def make():
    x = jnp.ones((2, 4, 16))
    block = Block()
    return block.apply, (block.init(jax.random.key(0), x), x)


def not_a_factory():
    return 42
"""

BROKEN_PASS = """
import jax
import jax.numpy as jnp

from graphopt.ops import primitive_op
from graphopt.pipeline import register_pass


@register_pass("test_cli_tanh_to_sin")
def tanh_to_sin(graph, ctx):
    \"\"\"A wrong rewrite, for bisect to find.\"\"\"
    for node in list(graph.nodes):
        if node.op.name == "tanh":
            new = graph.add_node(primitive_op(jax.lax.sin_p), node.inputs, node.params, before=node)
            graph.replace_all_uses(node.output, new.output)
            graph.erase(node)
    return graph


def f(x):
    return jnp.tanh(x) + 1.0
"""

RAISES = """
raise RuntimeError("the model file is broken")
"""

PLAIN_INPUTS = ["-i", "f32[2,3]", "-i", "f32[3,4]"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, text in [("plain", PLAIN), ("block", BLOCK), ("broken_pass", BROKEN_PASS), ("raises", RAISES)]:
        path = root / f"cli_{name}.py"
        path.write_text(textwrap.dedent(text))
        paths[name] = str(path)
    return paths


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["show"], ["optimize"], ["diff"], ["export"], ["compile"], ["bisect"],
                                     ["passes"], ["demo"]])
def test_help_for_every_command(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == OK
    assert out.startswith(f"usage: graphopt {' '.join(command)}".rstrip())
    assert "exit codes:" in out and "2 usage error" in out
    if command not in (["passes"], ["demo"]):
        assert "module:function or path/to/file.py:function" in out


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == USAGE and "required" in err


# --- show ----------------------------------------------------------------------------------------

def test_show_lists_the_traced_graph_with_sources(capsys, models):
    code, out, err = run(capsys, "show", f"{models['plain']}:f", *PLAIN_INPUTS)
    assert code == OK, err
    assert out.splitlines()[0] == "graph f(%x: f32[2,3], %w: f32[3,4]) {"
    assert "= tanh %0 : f32[2,4]  # cli_plain.py:5" in out


def test_show_after_a_pipeline_with_module_paths(capsys, models):
    code, out, err = run(capsys, "show", f"{models['block']}:make", "--pipeline", "default")
    assert code == OK, err
    assert "layer_norm[" in out and "# Block/ln · cli_block.py:10 · by raise_ops/layer-norm" in out
    assert "decomposition(" not in out  # composite ops are one line unless asked for
    code, full, _ = run(capsys, "show", f"{models['block']}:make", "--pipeline", "default", "--decompositions")
    assert code == OK and "decomposition(" in full


def test_show_summary_dot_and_output_file(capsys, models, tmp_path):
    code, out, _ = run(capsys, "show", f"{models['block']}:make", "--summary")
    assert code == OK and "parameters" in out and "dot_general" in out and "FLOPs" in out
    code, out, _ = run(capsys, "show", f"{models['block']}:make", "--dot", "--pipeline", "default")
    assert code == OK and out.startswith('digraph "Block.apply" {') and "subgraph cluster_" in out
    target = tmp_path / "listing.txt"
    code, out, _ = run(capsys, "show", f"{models['plain']}:f", *PLAIN_INPUTS, "--no-source", "-o", target)
    assert code == OK and out == ""
    assert target.read_text().splitlines()[1] == (
        "  %0 = dot_general[dimension_numbers=(((1,),(0,)),((),())) preferred_element_type=f32] %x, %w : f32[2,4]")


def test_show_module_syntax_and_params_argnums(capsys, models, monkeypatch):
    monkeypatch.chdir(os.path.dirname(models["plain"]))
    code, out, err = run(capsys, "show", "cli_plain:f", *PLAIN_INPUTS, "--params-argnums", "1")
    assert code == OK, err
    assert "%w: f32[3,4] param" in out


# --- optimize, diff ------------------------------------------------------------------------------

def test_optimize_prints_graph_and_report(capsys, models):
    code, out, err = run(capsys, "optimize", f"{models['block']}:make", "--report")
    assert code == OK, err
    assert "linear[" in out and "graphopt pipeline" in out
    for name in graphopt.pipeline.PIPELINES["default"]:
        assert name in out
    code, out, _ = run(capsys, "optimize", f"{models['block']}:make", "--summary", "--verify",
                       "--passes", "canonicalize, raise_ops(), dce")
    assert code == OK and "layer_norm" in out and "dot_general" not in out.split("op")[0]


def test_diff_groups_by_module_and_pass(capsys, models):
    code, out, err = run(capsys, "diff", f"{models['block']}:make")
    assert code == OK, err
    lines = out.splitlines()
    assert lines[0].startswith("diff Block.apply: ")
    assert "added by pass" in lines and "by module" in lines
    assert any(line.startswith("  raise_ops +") for line in lines)
    assert "  Block/ln" in [line.split("  −")[0].rstrip() for line in lines]
    code, out, _ = run(capsys, "diff", f"{models['plain']}:f", *PLAIN_INPUTS, "--pipeline", "none")
    assert code == OK and out.splitlines()[1] == "no changes"


# --- export --------------------------------------------------------------------------------------

def test_export_writes_a_loadable_artifact(capsys, models, tmp_path):
    target = tmp_path / "f.jaxexport"
    code, out, err = run(capsys, "export", f"{models['plain']}:f", *PLAIN_INPUTS, "--platforms", "cpu,tpu",
                         "-o", target)
    assert code == OK, err
    assert f"wrote {target}" in out and "cpu, tpu" in out
    exported = graphopt.deserialize(target.read_bytes())
    assert exported.platforms == ("cpu", "tpu")
    x, w = np.ones((2, 3), np.float32), np.full((3, 4), 0.1, np.float32)
    np.testing.assert_allclose(exported.call(x, w), np.tanh(x @ w) * 2.0, rtol=1e-6)


def test_export_bad_platform_and_missing_output(capsys, models, tmp_path):
    code, _, err = run(capsys, "export", f"{models['plain']}:f", *PLAIN_INPUTS, "--platforms", "tpu,gpu",
                       "-o", tmp_path / "x")
    assert code == USAGE and "unknown platform(s) gpu" in err
    code, _, err = run(capsys, "export", f"{models['plain']}:f", *PLAIN_INPUTS)
    assert code == USAGE and "-o/--output" in err


# --- compile -----------------------------------------------------------------------------------

def test_compile_for_cpu_prints_the_analyses_and_saves_the_program(capsys, models, tmp_path):
    code, out, err = run(capsys, "compile", f"{models['plain']}:f", *PLAIN_INPUTS, "--target", "cpu",
                         "--compare", "-o", tmp_path / "prog")
    assert code == OK, err
    lines = out.splitlines()
    assert lines[0] == "target cpu (cpu)"
    assert lines[1].split() == ["none", "default", "ratio"]
    assert any(line.split()[:3] == ["FLOPs", "56", "56"] for line in lines)  # matmul 2·2·3·4, scaling 8
    assert (tmp_path / "prog" / "executable.bin").stat().st_size > 0
    assert json.loads((tmp_path / "prog" / "program.json").read_text())["target"] == "cpu"


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install 'graphopt[tpu]')")
def test_compile_for_a_tpu_topology_without_a_tpu(capsys, models):
    code, out, err = run(capsys, "compile", f"{models['plain']}:f", *PLAIN_INPUTS, "--target", "tpu:v5e:2x2")
    assert code == OK, err
    assert out.startswith("target tpu:v5e:2x2 (TPU v5 lite; 4 device(s) in the topology)")
    assert "estimated" in out and "n/a" not in out


def test_compile_with_a_mesh_reports_the_collectives(capsys, models):
    code, out, err = run(capsys, "compile", f"{models['plain']}:f", *PLAIN_INPUTS, "--params-argnums", "1",
                         "--mesh", "1x1")
    assert code == OK, err
    assert "(per device)" in out and out.rstrip().endswith("collectives: none")


def test_compile_with_a_mesh_leaves_out_disabled_passes(capsys, models, monkeypatch):
    import graphopt.lowering.compile as compiling

    pipelines, real = [], compiling.compile
    monkeypatch.setattr(compiling, "compile", lambda *a, pipeline, **k: (pipelines.append(pipeline),
                                                                          real(*a, pipeline=pipeline, **k))[1])
    code, _, err = run(capsys, "compile", f"{models['plain']}:f", *PLAIN_INPUTS, "--params-argnums", "1",
                       "--mesh", "1x1", "--passes", "canonicalize,cse,dce", "--disable", "cse")
    assert code == OK, err
    assert [spec.name for spec in pipelines[0]] == ["canonicalize", "dce"]
    code, _, err = run(capsys, "compile", f"{models['plain']}:f", *PLAIN_INPUTS, "--mesh", "1x1",
                       "--disable", "no_such_pass")
    assert code != OK and "cannot disable unknown pass(es) ['no_such_pass']" in err


def test_bench_runs_the_checkouts_benchmark_suite(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == OK and out.startswith("usage: graphopt bench") and "--quick" in out
    code, _, err = run(capsys, "bench", "--models", "no_such_model")
    assert code == USAGE and "invalid choice: 'no_such_model'" in err


def test_compile_bad_targets(capsys, models):
    code, _, err = run(capsys, "compile", f"{models['plain']}:f", *PLAIN_INPUTS, "--target", "gpu")
    assert code == USAGE and "--target: unknown target 'gpu'" in err
    code, _, err = run(capsys, "compile", f"{models['plain']}:f", *PLAIN_INPUTS, "--target", "cuda")
    assert code == ERROR and "no cuda device on this machine" in err and "Traceback" not in err


# --- bisect, passes ------------------------------------------------------------------------------

def test_bisect_passes_and_finds_a_wrong_pass(capsys, models):
    code, out, err = run(capsys, "bisect", f"{models['plain']}:f", *PLAIN_INPUTS, "--passes", "canonicalize,dce")
    assert code == OK, err
    assert out.splitlines()[-1].startswith("every pass keeps the results")
    try:
        code, out, err = run(capsys, "bisect", f"{models['broken_pass']}:f", "-i", "f32[4]",
                             "--passes", "canonicalize, test_cli_tanh_to_sin, dce")
        # optimize --verify reverts the pass, warns in one message, and succeeds
        verified = run(capsys, "optimize", f"{models['broken_pass']}:f", "-i", "f32[4]", "--verify",
                       "--passes", "canonicalize, test_cli_tanh_to_sin, dce")
    finally:
        PASSES.pop("test_cli_tanh_to_sin", None)
    assert verified[0] == OK and "= tanh %x" in verified[1]
    assert verified[2].startswith("graphopt optimize: warning: pass 'test_cli_tanh_to_sin' (contract exact)")
    assert "pipeline.py" not in verified[2]
    assert code == BISECT_FOUND, err
    lines = out.splitlines()
    assert lines[:2] == ["bisect: canonicalize → test_cli_tanh_to_sin → dce", "  canonicalize: ok, error 0"]
    assert lines[2].startswith("pass 'test_cli_tanh_to_sin' (contract exact) changed the program's results")


def test_passes_lists_passes_and_pipelines(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == OK
    assert "  canonicalize " in out and "exact" in out
    assert out.splitlines()[-1].split()[:2] == ["default", "(="]


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("f32[2,3", "bad input spec 'f32[2,3'"),
    ("f32(2,3)", "write DTYPE[d0,d1,...]"),
    ("float[2]", "unknown dtype 'float'"),
    ("f32[2,,3]", "empty dimension"),
    ("f32[-1]", "bad input spec"),
])
def test_bad_input_spec_is_a_usage_error(capsys, models, spec, message):
    code, out, err = run(capsys, "show", f"{models['plain']}:f", "-i", spec)
    assert code == USAGE
    assert message in err and err.startswith("usage: graphopt show") and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("target, message", [
    ("no_such_module_xyz:f", "cannot find module 'no_such_module_xyz'"),
    ("no/such/file.py:f", "no such file: no/such/file.py"),
    ("{plain}:g", "has no attribute 'g'"),
    ("{plain}", "write module:function or path/to/file.py:function"),
    ("{plain}:f", "takes arguments (x, w): give one --input spec per argument"),  # no --input: a factory
    ("{block}:not_a_factory", "must return (fn, example_args); it returned 42"),
])
def test_model_not_found_is_a_usage_error(capsys, models, target, message):
    code, _, err = run(capsys, "show", target.format(**models))
    assert code == USAGE
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--passes", "canonicalize, no_such_pass"], "unknown pass 'no_such_pass'; known passes: "),
    (["--pipeline", "no_such_pipeline"], "unknown pipeline 'no_such_pipeline'"),
    (["--disable", "no_such_pass"], "cannot disable unknown pass(es) ['no_such_pass']"),
])
def test_unknown_pass_or_pipeline_is_an_error(capsys, models, args, message):
    code, _, err = run(capsys, "optimize", f"{models['plain']}:f", *PLAIN_INPUTS, *args)
    assert code == ERROR
    assert message in err and err.startswith("graphopt optimize: error: ") and "Traceback" not in err


def test_failures_in_the_model_are_errors_without_traceback(capsys, models):
    code, _, err = run(capsys, "show", f"{models['raises']}:f")
    assert code == ERROR
    assert "loading" in err and "RuntimeError: the model file is broken" in err and "Traceback" not in err
    code, _, err = run(capsys, "show", f"{models['plain']}:mismatched", "-i", "f32[2,3]")
    assert code == ERROR and "cannot trace mismatched" in err.lower() and "Traceback" not in err


def test_debug_shows_the_traceback(capsys, models):
    with pytest.raises(graphopt.GraphoptError, match="unknown pass"):
        main(["optimize", f"{models['plain']}:f", *PLAIN_INPUTS, "--passes", "nope", "--debug"])
    with pytest.raises(graphopt.GraphoptError, match="bad input spec"):
        main(["--debug", "show", f"{models['plain']}:f", "-i", "f32[x]"])


def test_usage_errors_from_argparse(capsys, models):
    code, _, err = run(capsys, "show", f"{models['plain']}:f", "--no-such-option")
    assert code == USAGE and "unrecognized arguments: --no-such-option" in err
    code, _, err = run(capsys, "show", f"{models['plain']}:f", "--pipeline", "default", "--passes", "dce")
    assert code == USAGE and "not allowed with argument" in err
    code, _, err = run(capsys, "show", f"{models['plain']}:f", "--params-argnums", "a")
    assert code == USAGE and "expected integers" in err


def test_the_installed_command_exits_with_these_codes(models):
    """The real process: `python -m graphopt.cli` (what the `graphopt` entry point runs)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad_spec = subprocess.run([sys.executable, "-m", "graphopt.cli", "show", f"{models['plain']}:f", "-i", "f32"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert bad_spec.returncode == USAGE and "bad input spec 'f32'" in bad_spec.stderr
    assert "Traceback" not in bad_spec.stderr
    unknown = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", f"{models['plain']}:f",
                              *PLAIN_INPUTS, "--passes", "nope"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert unknown.returncode == ERROR and "unknown pass 'nope'" in unknown.stderr


def test_example_arrays_are_reproducible():
    from graphopt.model_spec import example_arrays, parse_input_spec

    types = [parse_input_spec(s) for s in ("f32[2,3]", "i32[4]", "bool[3]", "bf16[2]", "f32[]")]
    a, b = example_arrays(types, seed=1), example_arrays(types, seed=1)
    assert [x.dtype for x in a] == [jnp.float32, jnp.int32, jnp.bool_, jnp.bfloat16, jnp.float32]
    assert all(np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)) for x, y in zip(a, b))
    assert 0 <= int(a[1].min()) and int(a[1].max()) < 8
