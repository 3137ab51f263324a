"""Pipelines: named sequences of passes run over a graph.

A pass is a function `Graph -> Graph`. Today every named pipeline is empty (the identity): the
foundation round-trips graphs exactly; passes register themselves here as they are added.

Example:
    >>> import graphopt, jax.numpy as jnp
    >>> g = graphopt.trace(jnp.sin, jnp.ones(2))
    >>> run_pipeline(g, "default") is g
    True
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

from graphopt.errors import GraphoptError

Pass = Callable[["Graph"], "Graph"]  # noqa: F821

PIPELINES: dict[str, tuple[Pass, ...]] = {
    "none": (),
    "default": (),
}

PipelineSpec = Union[str, Sequence[Pass]]


def resolve(pipeline: PipelineSpec) -> tuple[Pass, ...]:
    """A pipeline name or a sequence of pass functions → the passes to run."""
    if isinstance(pipeline, str):
        if pipeline not in PIPELINES:
            raise GraphoptError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(PIPELINES))}")
        return PIPELINES[pipeline]
    passes = tuple(pipeline)
    for p in passes:
        if not callable(p):
            raise GraphoptError(f"pipeline entries must be passes (Graph -> Graph), got {p!r}")
    return passes


def run_pipeline(graph, pipeline: PipelineSpec = "default"):
    """Run each pass of the pipeline in order and return the final graph."""
    for p in resolve(pipeline):
        graph = p(graph)
    return graph
