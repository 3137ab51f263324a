"""Recipes round-trip through JSON exactly and refuse what they cannot read."""

import json

import pytest

from graphopt.quant import QuantizationError, Recipe
from graphopt.quant.recipe import FLOAT_WEIGHTS, LayerRecipe


def _recipe():
    layers = (LayerRecipe("params/a/kernel", "dot_general", (64, 32), 0, "int8_static", None, True, "integer",
                          0.1 + 0.2),
              LayerRecipe("params/a/kernel", "dot_general", (64, 32), 1, "int4", 32, False, FLOAT_WEIGHTS),
              LayerRecipe("params/c/kernel", "conv", (3, 3, 8, 8), 0, "fp8", None, True, None, 1e-30))
    return Recipe(layers, "inference", ({"alpha": 0.5, "activation_max": [1.5, 2.25]},))


def test_json_round_trip_is_exact():
    recipe = _recipe()
    again = Recipe.from_json(recipe.to_json())
    assert again == recipe
    assert again.layers[0].act_scale == 0.1 + 0.2  # floats keep every bit
    assert again.layers[1].scheme_object.describe() == "int4 weights (group 32, asymmetric), float activations"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.pop("format"), "not a graphopt quantization recipe"),
    (lambda d: d["layers"][0].pop("form"), "has fields"),
])
def test_unreadable_recipes_are_named(edit, message):
    data = json.loads(_recipe().to_json())
    edit(data)
    with pytest.raises(QuantizationError, match=message):
        Recipe.from_json(json.dumps(data))
    with pytest.raises(QuantizationError, match="invalid JSON"):
        Recipe.from_json("{")
