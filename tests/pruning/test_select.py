"""Channel choice: ratios local and global, FLOP targets, rounding to multiples, rules, errors."""

import numpy as np
import pytest

from graphopt.passes.prune.deps import PruneError
from graphopt.pruning.select import Selection


def selection(**sizes):
    return Selection(sizes=sizes, paths={n: [f"params/{n}/kernel"] for n in sizes})


def test_local_ratio_keeps_the_highest_scores_of_every_group():
    sel = selection(a=16, b=8)
    s = {"a": np.arange(16.0)[::-1], "b": np.array([5, 1, 7, 3, 2, 8, 6, 4], float)}
    keep = sel.choose(s, ratio=0.5, scope="local", multiple=1)
    assert keep["a"].tolist() == list(range(8))
    assert keep["b"].tolist() == [0, 2, 5, 6]


def test_widths_stay_multiples_and_wide_channels_go_one_by_one():
    sel = selection(mlp=64, heads=4, small=32)
    sel.strides = {"heads": 32}  # a head spans 32 elements of its parameters: any count stays aligned
    s = {"mlp": np.random.default_rng(0).random(64), "heads": np.array([1.0, 2.0, 3.0, 4.0]),
         "small": np.arange(32.0)}
    keep = sel.choose(s, ratio=0.3, scope="local", multiple=8)
    assert len(keep["mlp"]) == 48          # 30% of 64 is 19.2 -> 16 removed in steps of 8
    assert keep["heads"].tolist() == [1, 2, 3]  # one head at a time: 30% of 4 is 1.2 -> 1 removed
    keep = sel.choose(s, ratio=0.5, scope="local", multiple=32)
    assert len(keep["small"]) == 16         # a group of one multiple goes in halves
    assert len(keep["mlp"]) == 32


def test_global_ratio_ranks_by_normalized_score():
    sel = selection(a=4, b=4)
    # group b's weights are 100x larger, but its first two channels are weak relative to its mean
    s = {"a": np.array([1.0, 1.0, 1.0, 1.0]), "b": np.array([10.0, 10.0, 190.0, 190.0])}
    keep = sel.choose(s, ratio=0.25, scope="global", multiple=1)
    assert "a" not in keep and keep["b"].tolist() == [2, 3]


def test_flops_target_is_met_by_the_estimate():
    rows = [(1000, [0]), (1000, [0, 1]), (500, [])]
    sel = Selection(sizes={"a": 8, "b": 8}, paths={"a": ["a"], "b": ["b"]}, flops_rows=rows, names=["a", "b"])
    s = {"a": np.ones(8), "b": np.ones(8)}
    for scope in ("global", "local"):
        keep = sel.choose(s, flops=0.4, scope=scope, multiple=1)
        kept = [len(keep.get(n, range(8))) for n in ("a", "b")]
        flops = 1000 * kept[0] / 8 + 1000 * kept[0] / 8 * kept[1] / 8 + 500
        assert flops <= 0.6 * 2500 + 1e-9, (scope, kept)


def test_rules_fix_or_exclude_groups():
    sel = selection(mlp=16, attn=16)
    s = {"mlp": np.arange(16.0), "attn": np.arange(16.0)}
    keep = sel.choose(s, ratio=0.5, scope="local", multiple=1, rules=[("attn", None), (r"mlp/kernel", 0.25)])
    assert "attn" not in keep and len(keep["mlp"]) == 12


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.5}, "in \\[0, 1\\)"),
    ({"ratio": 1.0, "scope": "local"}, "of group mlp .* would remove every channel"),
    ({"ratio": 1.0}, "without removing every channel"),
    ({"ratio": 0.5, "flops": 0.5}, "exactly one target"),
    ({}, "exactly one target"),
    ({"ratio": 0.5, "scope": "layer"}, "scope"),
    ({"ratio": 0.5, "rules": [("[", 0.5)]}, "not a valid regex"),
    ({"ratio": 0.5, "rules": [("nothing", 0.5)]}, "match no prunable group"),
    ({"ratio": 0.5, "rules": [("mlp", 1.0)]}, "of group mlp .* would remove every channel"),
    ({"ratio": 0.5, "rules": [("mlp", -0.5)]}, "ratio must be"),
])
def test_bad_requests_are_clear_errors(kwargs, message):
    sel = selection(mlp=16)
    with pytest.raises(PruneError, match=message):
        sel.choose({"mlp": np.ones(16)}, multiple=8, **kwargs)


def test_removable_groups_may_reach_zero_under_raw_global_ranking():
    sel = selection(weak=16, strong=16)
    sel.removable = frozenset({"weak"})
    s = {"weak": np.full(16, 0.01), "strong": np.arange(1.0, 17.0)}
    keep = sel.choose(s, ratio=0.5, multiple=8, normalize=False)
    assert keep["weak"].size == 0 and "strong" not in keep
    keep = sel.choose(s, ratio=0.5, multiple=8)  # normalized: the weak group is no longer weak
    assert keep["weak"].size == 8
