"""One process of the 2-process model-parallel run that tests/test_distributed.py starts.

    python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR DIR CPU_DEVICES CONFIG MODES

DIR holds the model's weights, `variables.safetensors` (keys: '/'-joined parameter paths), and
the batch, `tokens.npy`, both written by the test; CONFIG is the demo transformer's `DemoConfig`
as JSON (`{"layers": 2, "seq": 16, "batch": 4}`). Each process reads the same checkpoint (as
hosts of a cluster would), places the weights over the `model` axis and its own rows of the
batch over `data` on a global (data=NUM_PROCESSES, model=CPU_DEVICES) mesh, runs the optimized
model once per mode in MODES (comma-separated) and gathers the logits, into DIR:

- `manual`: Megatron specs by hand (`megatron_spec`), the graphopt-optimized function under
  `jax.jit(in_shardings=...)`;
- `shard`: `graphopt.shard` plans the specs and pins activations;

and writes

- `logits_<mode>_<id>.npy`: the gathered [batch, seq, vocab] float32 logits (NumPy, no pickle);
- `facts_<id>.json`: what this process saw (process and device counts, per mode the shapes of
  its own shards of the MLP's up kernel and of the batch, the collectives in the compiled
  program, the logits' sharding; wall and CPU time per phase).
"""

from __future__ import annotations

import json
import os
import sys
import time


def megatron_spec(path: str, leaf):
    """Megatron-style tensor parallelism for the demo transformer over mesh axis `model`.

    Attention: query/key/value split by head (column parallel), `out` by head (row parallel);
    MLP: `up` by column, `down` by row; embedding and head by vocabulary; the rest replicated.
    Each block then needs one all-reduce after attention and one after the MLP.
    """
    from jax.sharding import PartitionSpec as P

    name = path.split("/")
    if "attn" in name and name[-2] in ("query", "key", "value"):
        return P(None, "model", None) if name[-1] == "kernel" else P("model", None)
    if "attn" in name and name[-2] == "out":
        return P("model", None, None) if name[-1] == "kernel" else P()
    if name[-2:] == ["up", "kernel"] or name[-2:] == ["head", "kernel"]:
        return P(None, "model")
    if name[-2:] in (["up", "bias"], ["head", "bias"]):
        return P("model")
    if name[-2:] == ["down", "kernel"] or name[-2:] == ["embed", "embedding"]:
        return P("model", None)
    return P()


def read_checkpoint(file: str) -> dict:
    """The nested variables dict from a safetensors file keyed by '/'-joined paths."""
    from safetensors.numpy import load_file

    tree: dict = {}
    for path, array in load_file(file).items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = array
    return tree


def run_manual(model, variables, tokens, mesh, dist) -> tuple:
    """Megatron specs placed by hand; the optimized function jitted with `in_shardings`."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import graphopt

    params = dist.place(variables, mesh, megatron_spec)
    batch = _local_batch(tokens, mesh, P("data"), dist)
    optimized = graphopt.optimize(model.apply, params_argnums=0)
    in_shardings = (jax.tree_util.tree_map(lambda x: x.sharding, params), NamedSharding(mesh, P("data")))
    compiled = jax.jit(optimized, in_shardings=in_shardings).lower(params, batch).compile()
    return compiled(params, batch), params, batch, compiled.as_text()


def run_shard(model, variables, tokens, mesh, dist) -> tuple:
    """`graphopt.shard`: the plan chooses the specs; each process places its shards by the plan."""
    import graphopt

    sharded = graphopt.shard(model.apply, variables, tokens, mesh=mesh)
    params = dist.place(variables, mesh, lambda path, leaf: sharded.plan[path])
    (entry,) = [e for e in sharded.plan.entries if e.role == "input"]
    batch = _local_batch(tokens, mesh, entry.partition_spec, dist)
    return sharded(params, batch), params, batch, sharded.hlo()


def _local_batch(tokens, mesh, spec, dist):
    """This process's rows of the batch (it loads only those), as one global array."""
    import jax

    rows = tokens.shape[0] // jax.process_count()
    i = jax.process_index()
    return dist.place_local(tokens[i * rows:(i + 1) * rows], mesh, spec)


MODES = {"manual": run_manual, "shard": run_shard}


def main(argv: list[str]) -> None:
    process_id, num_processes, coordinator, out_dir = int(argv[0]), int(argv[1]), argv[2], argv[3]
    cpu_devices, config, modes = int(argv[4]), json.loads(argv[5]), argv[6].split(",")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    phases = {}  # phase -> (wall s, CPU s) since the previous phase: the machine may be shared

    def phase(name):
        nonlocal wall0, cpu0
        phases[name] = (round(time.perf_counter() - wall0, 3), round(time.process_time() - cpu0, 3))
        wall0, cpu0 = time.perf_counter(), time.process_time()

    from graphopt import distributed as dist

    dist.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                    cpu_devices=cpu_devices, timeout_s=60)
    import jax
    import numpy as np

    from graphopt.demo import DemoConfig, Transformer
    from graphopt.sharding import count_collectives
    phase("import_and_initialize")

    mesh = dist.global_mesh(data=num_processes, model=cpu_devices)
    model = Transformer(DemoConfig(**config))
    variables = read_checkpoint(os.path.join(out_dir, "variables.safetensors"))
    tokens = np.load(os.path.join(out_dir, "tokens.npy"), allow_pickle=False)
    facts = {"process_index": jax.process_index(), "process_count": jax.process_count(),
             "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
             "mesh": {k: int(v) for k, v in mesh.shape.items()}, "modes": {}}
    phase("read_checkpoint")
    for mode in modes:
        logits, params, batch, hlo = MODES[mode](model, variables, tokens, mesh, dist)
        phase(f"{mode}:optimize_and_compile")
        gathered = dist.gather(logits)
        phase(f"{mode}:run_and_gather")
        collectives = count_collectives(hlo)
        up = params["params"]["block_0"]["up"]["kernel"]
        facts["modes"][mode] = {
            "up_kernel_spec": str(up.sharding.spec),
            "up_kernel_local_shards": [list(s.data.shape) for s in up.addressable_shards],
            "batch_local_shards": [list(s.data.shape) for s in batch.addressable_shards],
            "logits_shape": list(logits.shape), "logits_spec": str(logits.sharding.spec),
            "logits_fully_addressable": bool(logits.is_fully_addressable),
            "all_reduce_ops": collectives["all-reduce"], "all_gather_ops": collectives["all-gather"],
        }
        np.save(os.path.join(out_dir, f"logits_{mode}_{process_id}.npy"), gathered, allow_pickle=False)
    facts["phases_wall_cpu_s"] = phases
    with open(os.path.join(out_dir, f"facts_{process_id}.json"), "w") as f:
        json.dump(facts, f, indent=1)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
