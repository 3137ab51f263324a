"""`MODELS`: every zoo model by name → its `build(size="quick" | "full", seed=0) -> ZooModel`.

Builders import their module on first call, so `import zoo` stays cheap.

>>> sorted(MODELS)
['bert_mini', 'charlm', 'digits', 'gpt_decode', 'gpt_prefill', 'mlp', 'resnet18', 'vit_tiny']
"""

from __future__ import annotations

import importlib

_PACKAGE = __name__.rpartition(".")[0]

# name -> (module, builder): the order is the benchmark's row order
_BUILDERS = {
    "mlp": ("mlp", "build"),
    "resnet18": ("resnet", "build"),
    "vit_tiny": ("vit", "build"),
    "bert_mini": ("bert", "build"),
    "gpt_prefill": ("gpt", "build_prefill"),
    "gpt_decode": ("gpt", "build_decode"),
    "digits": ("trained", "build_digits"),
    "charlm": ("trained", "build_charlm"),
}


def _lazy(module: str, attr: str):
    def build(size: str = "quick", seed: int = 0):
        return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), attr)(size, seed)

    build.__name__ = build.__qualname__ = f"build_{module}_{attr}"
    build.__doc__ = f"{_PACKAGE}.{module}.{attr}(size, seed), imported on first call."
    return build


MODELS = {name: _lazy(module, attr) for name, (module, attr) in _BUILDERS.items()}
