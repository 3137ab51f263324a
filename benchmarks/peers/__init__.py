"""Peer runtimes that graphopt is compared against, on the same zoo models and the same inputs.

- `peers.onnx_export`: a zoo model (its weights baked in) to an ONNX graph, with jax2onnx.
- `peers.onnxruntime`: that graph in ONNX Runtime on CPU, float32 and dynamic int8;
  `run_peer(model, quantize, repeats)`, and as a script the side-by-side table.

Use from the repository root (benchmarks/ is not installed):

>>> import sys; sys.path.insert(0, "benchmarks")                     # doctest: +SKIP
>>> from peers.onnxruntime import run_peer                           # doctest: +SKIP
>>> from zoo import bert                                             # doctest: +SKIP
>>> run_peer(bert.build("quick"), quantize=False, repeats=10)["max_error"] < 1e-4   # doctest: +SKIP
True
"""
