"""graphopt.passes: graph rewrites, one per module. Each registers itself with graphopt.pipeline."""
