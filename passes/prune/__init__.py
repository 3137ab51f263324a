"""Structured pruning's graph side: dimensions (`dims`) and per-op coupling rules (`rules`), the
channel groups they give (`deps`), the shrinking rewrite (`shrink`), the masked reference graph
(`masked`) and which groups may be removed whole, layers on a residual branch (`residual`). The
user-facing API (`graphopt.prune`), importance scores and recovery are in `graphopt.pruning`."""
