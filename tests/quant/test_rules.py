"""graphopt.quant.rules: which rule picks which layer, and rules that cannot work.

Rules are tried in order and the first match wins; a rule matches by path regex (re.search, so
unanchored), op kind and weight size (both bounds inclusive); `plan` reports rules that matched
nothing. Bad rules (regex, op, sizes, scheme names and options) fail when the rule is built, with
a message saying what to write instead.
"""

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.quant.rules import Decision, Layer, Rule, plan
from graphopt.quant.scheme import QuantizationError, scheme_named

LM_HEAD = Layer("params/lm_head/kernel", "dot_general", (64, 256))
MLP = Layer("params/block_0/mlp/Dense_0/kernel", "dot_general", (64, 256))
TINY = Layer("params/block_0/tiny/kernel", "dot_general", (8, 8))
CONV = Layer("params/stem/Conv_0/kernel", "conv", (3, 3, 3, 16))        # 432 elements
LAYERS = [LM_HEAD, MLP, TINY, CONV]


def chosen(rules, layers=LAYERS, default="int8"):
    decisions, unused = plan(layers, rules, default)
    return [(d.scheme, d.rule) for d in decisions], unused


def test_no_rules_gives_every_layer_the_default():
    decisions, unused = plan(LAYERS, [], "int8")
    assert decisions == [Decision(layer, "int8", None) for layer in LAYERS] and unused == []
    assert all(d.options == {} for d in decisions)


def test_first_match_wins():
    rules = [Rule(path="block_0", scheme="int4"), Rule(path="mlp", scheme=None), Rule(op="dot_general", scheme=None)]
    assert chosen(rules) == ([(None, 2), ("int4", 0), ("int4", 0), ("int8", None)], [1])


def test_path_is_an_unanchored_regex_search():
    assert chosen([Rule(path="lm_head")])[0][0] == (None, 0)                  # a substring matches
    assert chosen([Rule(path=r"^params/lm_head/kernel$")])[0][0] == (None, 0)
    assert chosen([Rule(path="^lm_head")], [LM_HEAD]) == ([("int8", None)], [0])   # anchored: no
    assert chosen([Rule(path=r"block_\d+/(mlp|tiny)")], [MLP, TINY, LM_HEAD])[0] == \
        [(None, 0), (None, 0), ("int8", None)]
    assert chosen([Rule(path="LM_HEAD")], [LM_HEAD])[1] == [0]                # case-sensitive
    assert chosen([Rule(path="(?i)LM_HEAD")], [LM_HEAD])[1] == []


def test_op_filter():
    assert chosen([Rule(op="conv", scheme="int8_static")]) == \
        ([("int8", None)] * 3 + [("int8_static", 0)], [])
    assert chosen([Rule(op="dot_general", scheme=None)])[0] == [(None, 0)] * 3 + [("int8", None)]


@pytest.mark.parametrize("min_size, max_size, matched", [
    (0, None, ["lm_head", "mlp", "tiny", "conv"]),
    (64, 64, ["tiny"]),                          # both bounds inclusive
    (65, None, ["lm_head", "mlp", "conv"]),
    (0, 63, []),
    (432, 432, ["conv"]),
    (433, 16383, []),
    (16384, None, ["lm_head", "mlp"]),
    (0, 16384, ["lm_head", "mlp", "tiny", "conv"]),
])
def test_size_bounds_are_inclusive_element_counts(min_size, max_size, matched):
    names = {"lm_head": LM_HEAD, "mlp": MLP, "tiny": TINY, "conv": CONV}
    rule = Rule(min_size=min_size, max_size=max_size, scheme=None)
    assert [n for n, layer in names.items() if rule.matches(layer)] == matched
    assert TINY.size == 64 and CONV.size == 432 and LM_HEAD.size == 16384


def test_all_conditions_must_hold():
    rule = Rule(path="block_0", op="dot_general", min_size=100, scheme=None)
    assert [rule.matches(layer) for layer in LAYERS] == [False, True, False, False]


def test_rules_given_as_dicts_work_like_rules():
    as_dicts = [{"path": "lm_head", "scheme": None}, {"max_size": 1023, "scheme": "int4", "options": {"group": 32}}]
    as_rules = [Rule(path="lm_head", scheme=None), Rule(max_size=1023, scheme="int4", options={"group": 32})]
    assert plan(LAYERS, as_dicts, "int8") == plan(LAYERS, as_rules, "int8")
    decisions, _ = plan(LAYERS, as_dicts, "int8")
    assert decisions[2].options == {"group": 32} and decisions[1].options == {}
    decisions[2].options["group"] = 64                      # a decision's options are its own copy
    assert as_rules[1].options == {"group": 32} and plan(LAYERS, as_dicts, "int8")[0][2].options == {"group": 32}


def test_rules_that_match_nothing_are_reported_as_unused():
    rules = [Rule(path="lm_haed", scheme=None),            # a typo
             Rule(path="lm_head", scheme=None),
             Rule(path="lm_head", scheme="int4"),          # shadowed by the rule before it
             Rule(op="conv", max_size=10, scheme=None)]
    decisions, unused = plan(LAYERS, rules, "int8")
    assert unused == [0, 2, 3]
    assert [d.rule for d in decisions] == [1, None, None, None]
    assert plan([], rules, "int8") == ([], [0, 1, 2, 3])


def test_default_can_be_none_or_a_scheme():
    scheme = scheme_named("int4", group=32)
    assert chosen([Rule(path="mlp", scheme=scheme)], default=None)[0] == \
        [(None, None), (scheme, 0), (None, None), (None, None)]


@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=20),
       bounds=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), min_size=1, max_size=5))
def test_plan_picks_the_first_rule_that_matches_and_reports_the_rest(sizes, bounds):
    layers = [Layer(f"params/layer_{i}/kernel", "dot_general", (n,)) for i, n in enumerate(sizes)]
    rules = [Rule(min_size=min(a, b), max_size=max(a, b), scheme=f"int{4 + 4 * (i % 2)}")
             for i, (a, b) in enumerate(bounds)]
    decisions, unused = plan(layers, rules, "fp8")
    for layer, decision in zip(layers, decisions):
        first = next((i for i, (a, b) in enumerate(bounds) if min(a, b) <= layer.size <= max(a, b)), None)
        assert decision.rule == first and decision.layer is layer
        assert decision.scheme == ("fp8" if first is None else rules[first].scheme)
    assert unused == sorted(set(range(len(rules))) - {d.rule for d in decisions})


# --- bad rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, match", [
    ("lm_head[", r"rule path 'lm_head\[' is not a valid regex: unterminated character set"),
    ("(mlp", r"missing \), unterminated subpattern"),
    ("*kernel", r"nothing to repeat.*escape special characters, e\.g\. with re\.escape"),
])
def test_invalid_regex_is_rejected_at_construction(path, match):
    with pytest.raises(QuantizationError, match=match):
        Rule(path=path)
    with pytest.raises(QuantizationError, match=match):
        plan(LAYERS, [{"path": path}], "int8")


def test_escaped_paths_match_literally():
    layer = Layer("params/blocks[0]/kernel", "dot_general", (4, 4))
    assert Rule(path=re.escape("blocks[0]")).matches(layer)


@pytest.mark.parametrize("op", ["matmul", "dot", "Conv", ""])
def test_invalid_op_is_rejected_naming_the_kinds(op):
    with pytest.raises(QuantizationError, match=rf"op must be one of dot_general, conv \(or None: any\), "
                                                rf"got {re.escape(repr(op))}"):
        Rule(op=op)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_size=-1), r"min_size and max_size must be ints >= 0"),
    (dict(max_size=1.5), r"must be ints >= 0 \(max_size may be None: no bound\)"),
    (dict(min_size=True), r"must be ints"),
    (dict(min_size=100, max_size=99), r"max_size 99 < min_size 100 matches no layer"),
    (dict(options=[("group", 32)]), r"options must be a dict"),
])
def test_bad_sizes_and_options_are_rejected(kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        Rule(**kwargs)
    Rule(min_size=np.int64(3), max_size=3)   # numpy ints are ints


@pytest.mark.parametrize("scheme, options, match", [
    ("int3", {}, r"rule any layer → int3: unknown quantization scheme 'int3'; known: int8, int4"),
    ("int4", {"group": 33}, r"rule any layer → int4: int4: group must be an even int >= 2"),
    ("fp8", {"symmetric": False}, r"fp8: floating formats are symmetric only"),
    ("int4", {"groups": 32}, r"options \['groups'\] are not all scheme options; they are: group, symmetric"),
])
def test_bad_scheme_names_and_options_are_rejected_at_construction(scheme, options, match):
    with pytest.raises(QuantizationError, match=match):
        Rule(scheme=scheme, options=options)


def test_dict_rules_with_unknown_fields_name_them_and_list_the_fields():
    with pytest.raises(QuantizationError, match=r"unknown fields \['paht'\]; a rule's fields are scheme, "
                                                r"path, op, min_size, max_size, options"):
        plan(LAYERS, [{"paht": "lm_head", "scheme": None}], "int8")
    with pytest.raises(QuantizationError, match=r"'lm_head': not a Rule or dict"):
        plan(LAYERS, ["lm_head"], "int8")


# --- describe -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, text", [
    (Rule(), "any layer → skip"),
    (Rule(scheme="int8"), "any layer → int8"),
    (Rule(path="lm_head", scheme=None), "path ~ 'lm_head' → skip"),
    (Rule(path=r"block_\d+", op="conv", min_size=10, max_size=100, scheme="int4"),
     r"path ~ 'block_\\d+' and op = conv and size >= 10 and size <= 100 → int4"),
    (Rule(max_size=0, scheme="fp8"), "size <= 0 → fp8"),
    (Rule(scheme=scheme_named("int4", group=64)), "any layer → int4"),
])
def test_describe(rule, text):
    assert rule.describe() == text
