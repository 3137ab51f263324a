"""Layer discovery and the dry run: which nodes are layers, what each rule picks, what matched nothing."""

import jax.numpy as jnp

import graphopt
from graphopt.pipeline import run_pipeline
from graphopt.quant import Rule, dry_run
from graphopt.quant.layers import find_layers


def _model():
    params = {"embed": jnp.ones((32, 16)), "blocks": [{"w": jnp.ones((16, 16))} for _ in range(2)],
              "conv": jnp.ones((3, 3, 4, 4)), "head": jnp.ones((16, 32))}

    def fn(p, tokens, image):
        h = p["embed"][tokens]                       # a gather: not a layer
        for block in p["blocks"]:
            h = h + jnp.tanh(h @ block["w"])
        attn = h @ h.T                               # both operands are activations: not a layer
        y = jnp.einsum("ij,ij->", attn, attn)
        z = graphopt_conv(image, p["conv"])
        return h @ p["head"], y, z, p["embed"] @ p["head"]   # the last: weights only, not a layer

    return fn, (params, jnp.zeros((8,), jnp.int32), jnp.ones((1, 6, 6, 4)))


def graphopt_conv(x, w):
    import jax

    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_find_layers_names_weights_by_parameter_path():
    fn, args = _model()
    graph = graphopt.trace(fn, *args, params_argnums=0)
    layers = [(s.layer.path, s.layer.op, s.layer.shape, s.side) for s in find_layers(graph)]
    assert layers == [("blocks/0/w", "dot_general", (16, 16), 1), ("blocks/1/w", "dot_general", (16, 16), 1),
                      ("conv", "conv", (3, 3, 4, 4), 1), ("head", "dot_general", (16, 32), 1)]


def test_transposed_weights_keep_their_parameter_name():
    graph = graphopt.trace(lambda p, x: x @ p["w"].T, {"w": jnp.ones((8, 4))}, jnp.ones((2, 4)), params_argnums=0)
    [site] = find_layers(graph)
    assert site.layer.path == "w" and site.layer.shape == (4, 8)


def test_dry_run_reports_rules_and_changes_nothing():
    fn, args = _model()
    graph = graphopt.trace(fn, *args, params_argnums=0)
    before = str(graph)
    plan = dry_run(graph, "int8", [Rule(path=r"^head$", scheme=None), Rule(op="conv", scheme="int8_dynamic"),
                                   Rule(max_size=100, scheme=None), Rule(path="lm_head", scheme="int4")])
    assert str(graph) == before
    assert [(d.layer.path, d.scheme, d.rule) for d in plan.decisions] == [
        ("blocks/0/w", "int8", None), ("blocks/1/w", "int8", None), ("conv", "int8_dynamic", 1), ("head", None, 0)]
    assert plan.unused == [2, 3]
    text = str(plan)
    assert "blocks/0/w" in text and "default" in text and "float (skipped)" in text
    assert "rule 3 (path ~ 'lm_head' → int4) matched no layer" in text


def test_raised_linear_ops_are_layers():
    graph = graphopt.trace(lambda p, x: x @ p["w"] + p["b"], {"w": jnp.ones((8, 4)), "b": jnp.ones(4)},
                           jnp.ones((2, 8)), params_argnums=0)
    graph = run_pipeline(graph, ["canonicalize", "raise_ops"]).graph
    assert [n.op.name for n in graph.nodes] == ["linear"]
    assert [(s.layer.path, s.kind) for s in find_layers(graph)] == [("w", "quantized_dot")]
