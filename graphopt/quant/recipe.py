"""A quantization recipe: what the quantize pass did to each layer, as data that saves as JSON.

Per layer: which weight (parameter path, op, weight shape, and its occurrence among the layers
reading that parameter), the scheme with its options, the form the layer runs in (a kernel name
from `lowering/quant_kernels.py`, None for the reference form, or "float-weights": codes
dequantized once in the prep because no quantized form was faster on the backend) and the
calibrated activation scale of static schemes. The quantize pass records one in
`graph.metadata["quantization"]`; `quantize(recipe=...)` replays it on a freshly traced model
with no timing and no calibration, so saved parameters (`graphopt.quant.artifact`) fit the graph.

The JSON form carries `FORMAT_VERSION`; a reader refuses versions it does not know. Floats are
written with Python's repr, which round-trips them exactly.

Example:
    >>> from graphopt.quant.rules import Layer
    >>> from graphopt.quant.scheme import scheme_named
    >>> entry = LayerRecipe.of(Layer("params/fc/kernel", "dot_general", (64, 10)), 0, scheme_named("int4", group=32))
    >>> recipe = Recipe((entry.with_form(None),), "inference")
    >>> Recipe.from_json(recipe.to_json()) == recipe
    True
    >>> recipe.layers[0].scheme_object.describe()
    'int4 weights (group 32), float activations'
"""

from __future__ import annotations

import dataclasses
import json

from graphopt.quant.scheme import QuantizationError, Scheme, scheme_named

FORMAT_VERSION = 1
FLOAT_WEIGHTS = "float-weights"
UNSET = "unset"              # a form not chosen yet (the quantize pass measures)


@dataclasses.dataclass(frozen=True)
class LayerRecipe:
    """What the quantize pass did to one layer."""

    path: str
    op: str                        # "dot_general" or "conv"
    shape: tuple
    occurrence: int                # 0 for the first layer reading this parameter, 1 for the next...
    scheme: str
    group: int | None = None
    symmetric: bool = True
    form: str | None = UNSET      # kernel name, None (reference form) or FLOAT_WEIGHTS
    act_scale: float | None = None  # static schemes: the calibrated activation scale

    @classmethod
    def of(cls, layer, occurrence: int, scheme: Scheme) -> "LayerRecipe":
        return cls(layer.path, layer.op, tuple(layer.shape), occurrence, scheme.name, scheme.group,
                   scheme.symmetric)

    @property
    def scheme_object(self) -> Scheme:
        return scheme_named(self.scheme, group=self.group, symmetric=self.symmetric)

    def with_form(self, form: str | None) -> "LayerRecipe":
        return dataclasses.replace(self, form=form)

    def with_act_scale(self, scale: float | None) -> "LayerRecipe":
        return dataclasses.replace(self, act_scale=None if scale is None else float(scale))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The quantize pass's decisions for a graph; `mode` is "inference" or "train"."""

    layers: tuple[LayerRecipe, ...]
    mode: str = "inference"
    smoothing: tuple = ()          # graphopt.quant.smooth records, JSON-able dicts

    def to_json(self) -> str:
        layers = [{**dataclasses.asdict(e), "shape": list(e.shape)} for e in self.layers]
        return json.dumps({"format": "graphopt.quantization-recipe", "version": FORMAT_VERSION,
                           "mode": self.mode, "layers": layers, "smoothing": list(self.smoothing)})

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise QuantizationError(f"not a quantization recipe (invalid JSON: {err})") from None
        if not isinstance(data, dict) or data.get("format") != "graphopt.quantization-recipe":
            raise QuantizationError("not a graphopt quantization recipe (no 'format' field)")
        if data.get("version") != FORMAT_VERSION:
            raise QuantizationError(f"quantization recipe version {data.get('version')!r} is not supported by "
                                    f"this graphopt (it reads version {FORMAT_VERSION}); upgrade graphopt")
        fields = {f.name for f in dataclasses.fields(LayerRecipe)}
        layers = []
        for entry in data["layers"]:
            if set(entry) != fields:
                raise QuantizationError(f"quantization recipe layer {entry.get('path')!r} has fields "
                                        f"{sorted(entry)}, expected {sorted(fields)}")
            layers.append(LayerRecipe(**{**entry, "shape": tuple(entry["shape"])}))
        return cls(tuple(layers), data["mode"], tuple(data.get("smoothing", ())))
