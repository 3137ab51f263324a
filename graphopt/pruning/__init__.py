"""graphopt.pruning: structured pruning that physically shrinks the graph, and sparsity masks.

    graphopt.prune(fn, *args, flops=0.3)      trace, find coupled channels, score, remove: PrunedModel
    load(path, fn, *args)                     a saved pruned model
    scores / Selection                        importance (l1, l2, wanda, taylor) and channel choice
    sparsify(fn, *args, method="n:m")         masked weights (magnitude or 2:4): sparse checkpoints, no speed

Under XLA only structured pruning gives speed: the graph really gets smaller (`passes/prune/`).
Unstructured and N:M masks (`graphopt.pruning.masks`) give sparse checkpoints, not speed.
"""

from graphopt.passes.prune.deps import PruneError, analyze
from graphopt.pruning.importance import scores
from graphopt.pruning.masks import Sparsified, SparsityError, load_sparsified, sparsify
from graphopt.pruning.model import PrunedModel, load, prune
from graphopt.pruning.report import PruneReport
from graphopt.pruning.select import Selection

__all__ = ["PruneError", "PruneReport", "PrunedModel", "Selection", "Sparsified", "SparsityError", "analyze", "load",
           "load_sparsified", "prune", "scores", "sparsify"]
