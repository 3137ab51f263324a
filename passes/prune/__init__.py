"""Structured pruning's graph side: channel dependencies (`deps`), the shrinking rewrite
(`shrink`) and the masked reference graph (`masked`). The user-facing API (`graphopt.prune`),
importance scores and recovery are in `graphopt.pruning`."""
