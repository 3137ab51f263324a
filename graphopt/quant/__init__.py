"""graphopt.quant: quantization as a graph rewrite — schemes, calibration, layer rules, saved artifacts.

    graphopt.quantize(fn, *args, scheme=...)    trace, run the pipeline with the quantize pass, prepare
    dry_run(graph, scheme, rules)               which rule picks which layer, changing nothing
    Calibration(batches, method=...)            example batches for static schemes (and smoothing)
    Rule(path=..., op=..., scheme=...)          layer selection, first match wins
    load(path, fn, *args)                       a saved quantized model
    distill(...)                                quantization-aware fine-tuning against the float model

The pass itself is `graphopt.passes.quantize` ("quantize" in pipelines).
"""

from graphopt.quant.layers import dry_run
from graphopt.quant.model import QuantizedModel, load, quantize
from graphopt.quant.observe import Calibration
from graphopt.quant.recipe import Recipe
from graphopt.quant.rules import Rule
from graphopt.quant.scheme import SCHEMES, QuantizationError, scheme_named

__all__ = ["Calibration", "QuantizationError", "QuantizedModel", "Recipe", "Rule", "SCHEMES", "dry_run", "load",
           "quantize", "scheme_named"]
