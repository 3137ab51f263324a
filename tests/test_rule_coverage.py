"""Every rewrite rule of the built-in passes fires in at least one test of its pass.

A rule that never fires is either dead or untested. The rules are those in `graphopt.pattern.RULES`
once `graphopt.passes` is imported (rules that tests define for themselves are not counted), and
"fires" means the rewrite driver applied it (`graphopt.pattern._apply` returned a rewrite).

How fires are counted: the suite runs under pytest-xdist, so the tests that fire rules run in other
worker processes, in an order nobody controls, possibly after this test. A recorder that lives in
one process, or fire counts that workers write to files for a final check, would see only part of
the suite and fail or pass depending on scheduling (and on `-k`). Instead this test runs the
rule-firing tests itself: a separate, serial pytest process, with `FireRecorder` as a plugin, over
the test files of the modules that define rules (tests mirror the modules: the rules of
`passes/canonicalize.py` are tested in `tests/passes/test_canonicalize.py`). The result is
deterministic and independent of `-n`, `-k` and the other tests; the cost is one more run of those
files, on one worker. The pass-property fuzzer is never part of it: random programs that happen to
fire a rule are no evidence that the rule is tested on purpose.

So a rule counts as covered when a test in its module's test file fires it.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax.numpy as jnp

import graphopt
from graphopt import pattern

ROOT = Path(__file__).resolve().parents[1]
CORPUS_EXCLUDES = {"test_pass_properties.py"}


class FireRecorder:
    """pytest plugin: counts rule fires in its process; writes them (as JSON) to `path` at the end."""

    def __init__(self, path: str | None):
        self.path = path
        self.fired: Counter = Counter()
        self.rules: list[str] = []
        self._original = None

    def install(self) -> "FireRecorder":
        import graphopt.passes  # noqa: F401  (registers the built-in passes and their rules)

        self.rules = sorted(pattern.RULES)
        self._original = original = pattern._apply

        def counting_apply(graph, rule, *args, **kwargs):
            new_nodes = original(graph, rule, *args, **kwargs)
            if new_nodes is not None:
                self.fired[rule.name] += 1
            return new_nodes

        pattern._apply = counting_apply
        return self

    def uninstall(self) -> None:
        pattern._apply = self._original

    def pytest_configure(self, config):
        self.install()

    def pytest_sessionfinish(self, session, exitstatus):
        with open(self.path, "w") as f:
            json.dump({"rules": self.rules, "fired": dict(self.fired), "exitstatus": int(exitstatus)}, f)


def _test_files() -> dict[str, str]:
    """Rule name → the test file of the module defining it (tests/passes/ if that is unknown)."""
    import graphopt.passes  # noqa: F401

    files = {}
    for name, rule in pattern.RULES.items():
        module = getattr(rule.replacement, "__module__", None) or ""
        if module.startswith("graphopt.passes."):
            files[name] = f"tests/passes/test_{module.rsplit('.', 1)[1]}.py"
        elif module.startswith("graphopt."):
            files[name] = f"tests/test_{module.rsplit('.', 1)[1]}.py"
        elif not module:
            files[name] = "tests/passes"
        # else: a rule that a test defined in this process; the run below does not see those
    return files


def test_every_rule_fires_in_the_tests_of_its_pass(tmp_path):
    files = _test_files()
    missing = sorted({f for f in files.values() if not (ROOT / f).exists()})
    corpus = sorted({f for f in files.values() if f not in missing})
    if not corpus:  # nothing to run (pytest without paths would run the whole suite)
        assert not files, f"rules without a test file ({', '.join(missing)}): {', '.join(sorted(files))}"
        return
    out = tmp_path / "fires.json"
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", *corpus,
            *(f"--ignore=tests/passes/{name}" for name in sorted(CORPUS_EXCLUDES))]
    code = (f"import importlib.util, sys, pytest\n"
            f"spec = importlib.util.spec_from_file_location('rule_coverage_plugin', {__file__!r})\n"
            f"module = importlib.util.module_from_spec(spec)\n"
            f"spec.loader.exec_module(module)\n"
            f"sys.exit(pytest.main({args!r}, plugins=[module.FireRecorder({str(out)!r})]))\n")
    # The ci hypothesis profile whatever this run's: coverage must not depend on fuzzing depth.
    env = {**os.environ, "GRAPHOPT_HYPOTHESIS_PROFILE": "ci"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=3600)
    tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
    # 0: passed, 1: some tests failed (reported by the main run; the fires still count), 5: no tests.
    assert run.returncode in (0, 1, 5) and out.exists(), \
        f"the pass tests did not run (exit {run.returncode}):\n{tail}"
    result = json.loads(out.read_text())
    never = [rule for rule in result["rules"] if not result["fired"].get(rule)]
    failed = "" if run.returncode != 1 else f"\n(some pass tests failed, which may be why):\n{tail}"
    absent = f"\n(test files that do not exist: {', '.join(missing)})" if missing else ""
    assert not never, (
        f"{len(never)} of {len(result['rules'])} rules never fire in {', '.join(corpus)}: "
        f"{', '.join(never)}. Add a test where each one fires to its pass's test file, or remove "
        f"the rule.{absent}{failed}")


def test_recorder_counts_fires_of_applied_rewrites_only():
    x = pattern.Var("x")
    rule = pattern.Rule("rule-coverage-self-test", pattern.Op("neg", pattern.Op("neg", x)),
                        lambda b, x: x)
    declined = pattern.Rule("rule-coverage-self-test-declined", pattern.Op("sin", x), lambda b, x: None)
    recorder = FireRecorder(None).install()
    try:
        graph = graphopt.trace(lambda v: jnp.sin(-(-v)), jnp.ones(3))
        pattern.rewrite(graph, [rule, declined])
    finally:
        recorder.uninstall()
        pattern.RULES.pop(rule.name, None)
        pattern.RULES.pop(declined.name, None)
    assert recorder.fired == Counter({"rule-coverage-self-test": 1})
    assert pattern._apply is recorder._original
