"""graphopt: a compiler-style graph optimizer for JAX models.

Trace a model into graphopt's IR, rewrite it with passes, lower it back to JAX for XLA.

Example:
    >>> import graphopt, jax, jax.numpy as jnp
    >>> graph = graphopt.trace(lambda w, x: jax.nn.relu(x @ w), jnp.ones((4, 2)), jnp.ones(4),
    ...                        params_argnums=0)
    >>> f = graphopt.lower(graph)
    >>> jax.jit(f)(jnp.ones((4, 2)), jnp.ones(4)).tolist()
    [4.0, 4.0]
"""

from graphopt import control_flow as _control_flow  # noqa: F401  (registers region ops)
from graphopt.api import Optimized, optimize
from graphopt.errors import (GraphError, GraphoptError, GraphoptWarning, SignatureError, TargetError,
                             TraceError, ValidationError, ValidationWarning)
from graphopt.ir import Argument, Graph, Node, Provenance, Value
from graphopt.lowering import cache
from graphopt.lowering.emit import lower
from graphopt.lowering.compile import CompiledProgram, compile
from graphopt.lowering.export import deserialize, export
from graphopt.param_prep import prepare
from graphopt.pipeline import register_pass, run_pipeline
from graphopt.pruning import prune
from graphopt.quant import quantize
from graphopt.sharding import shard
from graphopt.trace import trace
from graphopt.types import TensorType
from graphopt.validate import BisectResult, Validator, bisect

__version__ = "0.1.0"

__all__ = [
    "Argument", "BisectResult", "CompiledProgram", "Graph", "GraphError", "GraphoptError",
    "GraphoptWarning", "Node", "Optimized", "Provenance", "SignatureError", "TargetError",
    "TensorType", "TraceError", "ValidationError", "ValidationWarning", "Validator", "Value",
    "bisect", "cache", "compile", "deserialize", "export", "lower", "optimize", "prepare", "prune",
    "quantize", "register_pass", "run_pipeline", "shard", "trace",
]
