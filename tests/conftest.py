"""Shared pytest configuration for the graphopt test suite."""

import os

# Tests run on CPU unless the caller asked for something else; this has to
# happen before jax initializes its backends, i.e. before any test imports it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# graphopt's caches (on by default for users) would let one test's stored program serve another
# test that monkeypatches graphopt's internals, and would write to ~/.cache: off for the suite.
# tests/lowering/test_cache.py turns them on, in folders of its own.
os.environ.setdefault("GRAPHOPT_CACHE", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

# ---------------------------------------------------------------------------
# Hypothesis profiles. Pick one with GRAPHOPT_HYPOTHESIS_PROFILE=ci|deep|dev.
#   ci:   the default; small enough for a 2-core CI runner.
#   deep: a long fuzzing run, to be started by hand (expect tens of minutes).
# Every example compiles XLA programs, so per-example time varies a lot:
# never let a deadline turn compile-time jitter into a failure.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=50, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("deep", max_examples=2000, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.load_profile(os.environ.get("GRAPHOPT_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when the marker expression names them (`pytest -m slow`): CI's plain
    `pytest -n 2` skips them."""
    import pytest

    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------
# Fixtures shared across test modules go below this line.
