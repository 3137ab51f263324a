"""graphopt.lowering: Graph → JAX function (emit), jax.export artifacts (export)."""

from graphopt.lowering.emit import GraphFunction, evaluate, lower, register_kernel, signature
from graphopt.lowering.export import deserialize, export

__all__ = ["GraphFunction", "deserialize", "evaluate", "export", "lower", "register_kernel", "signature"]
