"""graphopt.implementations: timing graphs (how many runs a measurement makes)."""

import time

import jax
import jax.numpy as jnp
import numpy as np

import graphopt
from graphopt import implementations


def _counted(seconds: float):
    """A traced graph whose every run calls back into Python once (sleeping `seconds`), and the
    list that the calls are appended to."""
    calls = []

    def host(x):
        calls.append(1)
        time.sleep(seconds)
        return x

    def fn(x):
        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    return graphopt.trace(fn, jnp.ones(3, jnp.float32)), calls


def test_a_long_run_is_timed_once_per_sample_without_a_second_warm_up():
    graph, calls = _counted(0.03)  # 30 ms: 10 samples of 2 ms or more
    times = implementations.time_graphs({"slow": graph}, repeats=3)
    assert len(calls) == 1 + 3  # the warm-up, then one call per sample
    assert times["slow"] >= 0.03


def test_a_short_run_is_timed_again_before_sampling_many_calls():
    graph, calls = _counted(0.0)
    times = implementations.time_graphs({"fast": graph}, repeats=2, sample_seconds=0.05)
    per_sample = (len(calls) - 2) / 2  # the warm-up and the run that sets the count, then samples
    assert per_sample == int(per_sample) and per_sample > 1
    assert np.isfinite(times["fast"]) and times["fast"] > 0
