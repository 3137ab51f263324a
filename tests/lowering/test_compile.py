import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import graphopt
from graphopt.demo import DemoConfig, demo_model
from graphopt.errors import TargetError
from graphopt.lowering.compile import load
from graphopt.lowering.target import libtpu_available
from graphopt.testing import assert_equivalent

needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed "
                                  "(pip install 'graphopt[tpu]'): no TPU compiler on this machine")


@pytest.fixture(scope="module")
def transformer():
    return demo_model(DemoConfig(layers=1, seq=32))


def test_cpu_program_has_analyses_and_runs_like_the_model(transformer):
    model, variables, tokens = transformer
    program = graphopt.compile(model.apply, variables, tokens, params_argnums=0, target="cpu")
    assert program.cost.flops > 0 and program.cost.bytes_accessed > 0
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(variables))
    assert program.memory.argument_bytes >= param_bytes  # prepared parameters + tokens
    assert program.memory.output_bytes == np.prod(model.apply(variables, tokens).shape) * 4
    assert "stablehlo" in program.stablehlo and "HloModule" in program.hlo
    assert_equivalent(program(variables, tokens), model.apply(variables, tokens), rtol=1e-4, atol=1e-5)


def test_saved_program_loads_and_runs_with_prepared_arguments(transformer, tmp_path):
    model, variables, tokens = transformer
    program = graphopt.compile(model.apply, variables, tokens, params_argnums=0, target="cpu")
    program.save(tmp_path / "prog")
    metadata = json.loads((tmp_path / "prog" / "program.json").read_text())
    assert metadata["target"] == "cpu" and metadata["memory"]["output_bytes"] == program.memory.output_bytes
    loaded = load(tmp_path / "prog")
    (out,) = loaded(*graphopt.prepare(program.graph, variables, tokens))
    assert_equivalent(out, model.apply(variables, tokens), rtol=1e-4, atol=1e-5)
    with pytest.raises(TargetError, match="the program takes"):
        loaded(tokens)


def test_abstract_arguments_compile_without_arrays():
    w = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    x = jax.ShapeDtypeStruct((8, 1024), jnp.float32)
    program = graphopt.compile(lambda w, x: jnp.tanh(x @ w), w, x, params_argnums=0, target="cpu")
    assert program.cost.flops == pytest.approx(2 * 8 * 1024 * 1024, rel=0.01)
    assert program.memory.argument_bytes == (1024 + 8) * 1024 * 4


def test_sharded_compile_binds_static_arguments():
    def chain(w, steps, x):  # `steps` is a Python int: the loop unrolls
        for _ in range(steps):
            x = jnp.tanh(x @ w)
        return x

    w, x = jax.ShapeDtypeStruct((256, 256), jnp.float32), jax.ShapeDtypeStruct((8, 256), jnp.float32)
    flops = {steps: graphopt.compile(chain, w, steps, x, params_argnums=0, static_argnums=1, target="cpu",
                                     mesh="1x1").cost.flops for steps in (1, 3)}
    assert flops[1] >= 2 * 8 * 256 * 256 and flops[3] == pytest.approx(3 * flops[1], rel=0.05)


def test_load_rejects_a_folder_of_something_else(tmp_path):
    (tmp_path / "program.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(TargetError, match="does not hold a graphopt compiled program"):
        load(tmp_path)


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_transformer_compiles_for_tpu_before_and_after_the_default_pipeline(transformer, topology, tmp_path):
    model, variables, tokens = transformer
    programs = {pipeline: graphopt.compile(model.apply, variables, tokens, params_argnums=0,
                                           target=f"tpu:{topology}", pipeline=pipeline)
                for pipeline in ("none", "default")}
    for program in programs.values():
        assert program.device_kind.startswith("TPU v")
        assert program.cost.flops > 0 and program.cost.estimated_seconds > 0
        assert program.memory.argument_bytes > 0 and program.memory.output_bytes > 0
        assert program.memory.generated_code_bytes > 0
        assert len(program.serialize()) > 10_000
        assert "tpu" in program.stablehlo.lower() or "mhlo" in program.stablehlo
    # The default pipeline folds the frozen-weight work away: less memory traffic on the TPU too.
    assert programs["default"].cost.bytes_accessed < programs["none"].cost.bytes_accessed
    with pytest.raises(TargetError, match=f"compiled for tpu:{topology}, which is not on this machine"):
        programs["default"](variables, tokens)
    saved = programs["default"].save(tmp_path / "tpu")
    assert json.loads((saved / "program.json").read_text())["device_kind"].startswith("TPU")
    with pytest.raises(TargetError, match="this machine has no tpu device"):
        load(saved)


@needs_libtpu
def test_sharded_compile_splits_the_parameters_across_tpu_chips(transformer):
    model, variables, tokens = transformer  # 4 heads: one per chip on a 1x4 mesh
    single = graphopt.compile(model.apply, variables, tokens, target="tpu:v5e:2x2")
    sharded = graphopt.compile(model.apply, variables, tokens, target="tpu:v5e:2x2", mesh="1x4")
    assert sharded.memory.argument_bytes < single.memory.argument_bytes / 2
    assert sharded.cost.flops < single.cost.flops / 2  # per device
    # Megatron: one all-reduce after the attention block, one after the MLP.
    assert {k: n for k, n in sharded.collectives().items() if n} == {"all-reduce": 2}
    assert "collectives: all-reduce 2" in sharded.summary()
    with pytest.raises(TargetError, match="a 2x4 mesh needs 8 devices; the target has 4"):
        graphopt.compile(model.apply, variables, tokens, target="tpu:v5e:2x2", mesh="2x4")


@needs_libtpu
def test_a_tpu_target_gets_tpu_kernels_not_this_machines():
    # The pipeline picks kernels for the target (fuse_attention(backend="tpu")) and the lowering
    # emits them: at 128 tokens, the Pallas flash kernel, a Mosaic custom call in the TPU program.
    model, variables, tokens = demo_model(DemoConfig(layers=1, seq=128))
    program = graphopt.compile(model.apply, variables, tokens, target="tpu:v5e:2x2")
    assert [n.params["implementation"] for n in program.graph.walk() if n.op.name == "attention"] == \
        ["pallas_flash"]
    assert "tpu_custom_call" in program.hlo
