"""graphopt.passes: graph rewrites, one per module; each registers itself with graphopt.pipeline.

Importing this package registers every built-in pass.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
