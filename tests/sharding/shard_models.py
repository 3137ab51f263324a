"""Models for the sharding tests, and their hand-written Megatron shardings (the baselines).

The baselines are what a person writes without graphopt: `jax.jit` of the original model with
hand-chosen `in_shardings` and `jax.lax.with_sharding_constraint` on the layer outputs (for the
Flax demo transformer through `nn.intercept_methods`, so the model itself is unchanged).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from graphopt.demo import DemoConfig, Transformer

DEMO = DemoConfig(layers=1, seq=8, heads=8, width=64, batch=8, vocab=256)


def demo(config: DemoConfig = DEMO):
    """(model, variables, tokens), initialized with one compiled init (fast)."""
    model = Transformer(config)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (config.batch, config.seq), 0, config.vocab)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    return model, variables, tokens


# Megatron by hand for the demo transformer: (module name -> kernel spec, bias spec, output spec).
_DEMO_LAYERS = {
    "query": (P(None, "model", None), P("model", None), P("data", None, "model", None)),
    "key": (P(None, "model", None), P("model", None), P("data", None, "model", None)),
    "value": (P(None, "model", None), P("model", None), P("data", None, "model", None)),
    "out": (P("model", None, None), P(None), P("data", None, None)),
    "up": (P(None, "model"), P("model"), P("data", None, "model")),
    "down": (P("model", None), P(None), P("data", None, None)),
    "head": (P(None, "model"), P("model"), P("data", None, "model")),
}


def demo_megatron(model, variables, tokens, mesh):
    """The hand-written Megatron sharding of the demo transformer: (jitted fn, placed args)."""
    def spec(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-2] in _DEMO_LAYERS:
            kernel, bias, _ = _DEMO_LAYERS[names[-2]]
            return NamedSharding(mesh, kernel if names[-1] == "kernel" else bias)
        return NamedSharding(mesh, P())

    def constrain(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        layer = _DEMO_LAYERS.get(context.module.name)
        if context.method_name == "__call__" and layer and isinstance(context.module, (nn.Dense, nn.DenseGeneral)):
            out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, layer[2]))
        return out

    def apply(variables, tokens):
        with nn.intercept_methods(constrain):
            return model.apply(variables, tokens)

    shardings = (jax.tree_util.tree_map_with_path(spec, variables), NamedSharding(mesh, P("data", None)))
    return jax.jit(apply, in_shardings=shardings), jax.device_put((variables, tokens), shardings)


def mlp(params, x):
    """A hand-written two-layer MLP with biases."""
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def mlp_params(d=32, hidden=64, out=16):
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    return {"w1": jax.random.normal(k1, (d, hidden)) / d ** 0.5, "b1": jnp.full((hidden,), 0.1),
            "w2": jax.random.normal(k2, (hidden, out)) / hidden ** 0.5, "b2": jnp.full((out,), -0.1)}


def mlp_megatron(params, x, mesh):
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}

    def fn(params, x):
        h = jax.nn.gelu(x @ params["w1"] + params["b1"])
        h = jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P("data", "model")))
        y = h @ params["w2"] + params["b2"]
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P("data", None)))

    shardings = ({k: NamedSharding(mesh, s) for k, s in specs.items()}, NamedSharding(mesh, P("data", None)))
    return jax.jit(fn, in_shardings=shardings), jax.device_put((params, x), shardings)


def scaling_module():
    """docs/scaling.py (its Llama-shaped `decoder` and `Config`), loaded from the repository."""
    path = Path(__file__).resolve().parents[2] / "docs" / "scaling.py"
    spec = importlib.util.spec_from_file_location("graphopt_docs_scaling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
