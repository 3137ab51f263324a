"""Per-device memory of a Llama-2-70B-shaped decoder under graphopt's sharding pass, on paper.

    python docs/scaling.py [--layers N] [--json FILE]

The decoder below is traced with `jax.ShapeDtypeStruct` arguments only (no 70B array is ever
allocated); `graphopt.sharding.plan_model` makes the plan the sharding pass would make on a
256-chip mesh, and `param_memory` (the same code as `Sharded.report`) gives per-device parameter
bytes. Activations, optimizer state and the KV cache are estimated with the formulas printed
beside them (see docs/scaling.md). The same `decoder` runs, at a small size and on 8 simulated
devices, in tests/passes/test_shard.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int = 80
    d_model: int = 8192
    ffn: int = 28672
    heads: int = 64
    kv_heads: int = 8
    vocab: int = 32000
    dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


LLAMA2_70B = Config()


def param_shapes(c: Config) -> dict:
    """The decoder's parameters as `jax.ShapeDtypeStruct`s."""
    dt, d, hd = jnp.dtype(c.dtype), c.d_model, c.head_dim

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dt)

    layer = lambda: {"attn_norm": s(d), "wq": s(d, c.heads * hd), "wk": s(d, c.kv_heads * hd),
                     "wv": s(d, c.kv_heads * hd), "wo": s(c.heads * hd, d), "mlp_norm": s(d),
                     "w_gate": s(d, c.ffn), "w_up": s(d, c.ffn), "w_down": s(c.ffn, d)}
    return {"embed": s(c.vocab, d), "layers": [layer() for _ in range(c.layers)], "norm": s(d),
            "lm_head": s(d, c.vocab)}


def init_params(c: Config, key) -> dict:
    """Random parameters with `param_shapes`' structure (for small configs: tests)."""
    shapes = param_shapes(c)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    arrays = [jnp.ones(s.shape, s.dtype) if s.ndim == 1 else
              (jax.random.normal(k, s.shape, jnp.float32) / np.sqrt(s.shape[0])).astype(s.dtype)
              for k, s in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(tree, arrays)


def _rms_norm(x, scale, eps=1e-5):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype) * scale


def _rope(x, positions):
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]          # [T, half]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x.dtype)


def decoder(params: dict, tokens, c: Config = LLAMA2_70B):
    """Llama-2: RMSNorm, RoPE, grouped-query causal attention, SwiGLU MLP; logits [B, T, vocab]."""
    b, t = tokens.shape
    hd, group = c.head_dim, c.heads // c.kv_heads
    x = jnp.take(params["embed"], tokens, axis=0)
    positions = jnp.arange(t)
    mask = jnp.tril(jnp.ones((t, t), bool))
    for p in params["layers"]:
        h = _rms_norm(x, p["attn_norm"])
        q = _rope((h @ p["wq"]).reshape(b, t, c.heads, hd), positions)
        k = _rope((h @ p["wk"]).reshape(b, t, c.kv_heads, hd), positions)
        v = (h @ p["wv"]).reshape(b, t, c.kv_heads, hd)
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), -1).astype(x.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c.heads * hd)
        x = x + attn @ p["wo"]
        h = _rms_norm(x, p["mlp_norm"])
        x = x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
    return _rms_norm(x, params["norm"]) @ params["lm_head"]


# (name, mesh, fsdp): the 256-chip layouts compared in docs/scaling.md.
LAYOUTS = [("data 16 x model 16", {"data": 16, "model": 16}, False),
           ("data 16 x model 16, FSDP", {"data": 16, "model": 16}, True),
           ("data 32 x model 8", {"data": 32, "model": 8}, False),
           ("data 32 x model 8, FSDP", {"data": 32, "model": 8}, True),
           ("data 256 (FSDP only)", {"data": 256, "model": 1}, True)]


def estimates(c: Config, mesh: dict, fsdp: bool, param_bytes: int, params: int, *, batch: int,
              seq: int, kv_split: bool) -> dict:
    """Per-device bytes of what the plan does not hold, by formula (see docs/scaling.md)."""
    d, m = mesh["data"], mesh["model"]
    bpe = jnp.dtype(c.dtype).itemsize
    local_batch = batch // d
    # Adam in float32: master copy + two moments = 12 bytes per parameter, laid out like the
    # parameters (sharded over data only with FSDP/ZeRO).
    optimizer = 12 * param_bytes // bpe
    # Training activations saved for the backward pass with full rematerialization of each layer:
    # the layer inputs, [local batch, seq, d_model] per layer (replicated over model).
    activations = c.layers * local_batch * seq * c.d_model * bpe
    # Inference KV cache: 2 (K, V) x layers x kv_heads x head_dim x seq x local batch, split over
    # model only when model divides the KV heads (else replicated, as the plan does).
    kv = 2 * c.layers * c.kv_heads * c.head_dim * seq * local_batch * bpe // (m if kv_split else 1)
    return {"optimizer": optimizer, "activations_remat": activations, "kv_cache": kv}


def project(c: Config, layers_traced: int | None = None, *, batch: int = 256, seq: int = 4096) -> list[dict]:
    import graphopt
    from graphopt.sharding import make_plan, param_memory
    from graphopt.sharding.analysis import analyze

    traced = c if layers_traced is None else dataclasses.replace(c, layers=layers_traced)
    shapes = param_shapes(traced)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    # Tracing and the dataflow analysis do not depend on the mesh: once for every layout.
    start, cpu = time.perf_counter(), time.process_time()
    graph = graphopt.trace(lambda p, x: decoder(p, x, traced), shapes, tokens, params_argnums=0)
    analysis = analyze(graph)
    trace_seconds, trace_cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = []
    for name, mesh, fsdp in LAYOUTS:
        start, cpu = time.perf_counter(), time.process_time()
        plan = make_plan(graph, mesh, fsdp=fsdp, analysis=analysis)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        memory = param_memory(plan)
        per_layer = {path.split("/", 2)[-1]: memory.per_param[path][0]
                     for path in memory.per_param if path.startswith("layers/0/")}
        fixed = sum(v[0] for k, v in memory.per_param.items() if not k.startswith("layers/"))
        if traced.layers == c.layers:  # every layer traced: the plan's own sum
            per_device, total = memory.per_device, memory.total
        else:  # layers are identical: layer 0's bytes times the layer count
            per_device = fixed + c.layers * sum(per_layer.values())
            total = sum(v[1] for k, v in memory.per_param.items() if not k.startswith("layers/")) + \
                c.layers * sum(memory.per_param[f"layers/0/{k}"][1] for k in per_layer)
        kv_split = plan["layers/0/wk"][1] == "model"
        rows.append({"layout": name, "mesh": mesh, "fsdp": fsdp, "param_bytes_total": total,
                     "param_bytes_per_device": per_device, "per_layer": per_layer,
                     "specs": {k: str(plan[f"layers/0/{k}"]) for k in per_layer} |
                              {"embed": str(plan["embed"]), "lm_head": str(plan["lm_head"])},
                     "kv_split": bool(kv_split), "trace_seconds": trace_seconds, "trace_cpu_seconds": trace_cpu,
                     "plan_seconds": seconds, "plan_cpu_seconds": cpu,
                     **estimates(c, mesh, fsdp, per_device, total // 2, batch=batch, seq=seq, kv_split=kv_split)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="layers to trace (default: all 80)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    rows = project(LLAMA2_70B, args.layers)
    gib = 1024 ** 3
    print(f"Llama-2-70B shape, bf16; traced {args.layers or LLAMA2_70B.layers} layers; batch 256 x seq 4096; "
          f"trace and analysis {rows[0]['trace_seconds']:.1f}s wall, {rows[0]['trace_cpu_seconds']:.1f}s CPU (once)")
    print(f"{'layout':28} {'params total':>12} {'params/dev':>10} {'Adam/dev':>9} {'acts/dev':>9} "
          f"{'KV/dev':>8}  wk spec")
    for r in rows:
        print(f"{r['layout']:28} {r['param_bytes_total'] / gib:10.1f}Gi {r['param_bytes_per_device'] / gib:8.2f}Gi "
              f"{r['optimizer'] / gib:7.2f}Gi {r['activations_remat'] / gib:7.2f}Gi {r['kv_cache'] / gib:6.2f}Gi  "
              f"{r['specs']['wk']}  (plan {r['plan_seconds']:.1f}s wall, {r['plan_cpu_seconds']:.1f}s CPU)")
    for r in rows[:1] + rows[3:4]:
        print(f"\n{r['layout']}: per-layer specs and per-device bytes")
        for k, v in r["per_layer"].items():
            print(f"  {k:10} {r['specs'][k]:40} {v / 2**20:9.2f} MiB")
        print(f"  embed {r['specs']['embed']}, lm_head {r['specs']['lm_head']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
