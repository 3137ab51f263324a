"""graphopt.distributed: the optimized demo transformer on 2 processes x 4 CPU devices equals the
single-process run; the helpers check their arguments.

The two-process test starts tests/distributed_worker.py twice (`sys.executable`), connected by
`jax.distributed` through a coordinator on a free localhost port, under a hard time limit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import graphopt
from graphopt import distributed as dist
from graphopt.demo import DemoConfig, demo_model
from graphopt.testing import assert_equivalent

WORKER = Path(__file__).with_name("distributed_worker.py")
CONFIG = {"layers": 2, "seq": 16, "batch": 4}  # batch: 2 rows per process; 4 heads: 1 per device
PROCESSES, CPU_DEVICES = 2, 4
MODES = ("manual", "shard")  # Megatron specs by hand + jax.jit(in_shardings); graphopt.shard
TIME_LIMIT_S = 120
# The sharded program sums the attention and MLP outputs over 4 devices (all-reduce) where the
# single-process one sums in one dot: float32 rounding of reordered sums, through the layer norms
# and the head (logits up to ~5, contractions of length 128 and 512). Seen: max |diff| 2.6e-6.
RTOL, ATOL = 1e-5, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # device counts come from initialize(cpu_devices=...)
    procs = []
    for i in range(PROCESSES):
        argv = [sys.executable, str(WORKER), str(i), str(PROCESSES), coordinator, str(out),
                str(CPU_DEVICES), json.dumps(CONFIG), ",".join(MODES)]
        with open(out / f"stdout_{i}.txt", "w") as stdout, open(out / f"stderr_{i}.txt", "w") as stderr:
            procs.append(subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr))
    return procs


def _wait(procs: list[subprocess.Popen], out: Path, limit_s: float, start: float) -> None:
    """Wait for every worker; on a failure or past the deadline, kill them all and fail with their
    stderr (a process whose peer died would otherwise wait for it until its own timeout)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = any(c not in (None, 0) for c in codes)
        late = time.monotonic() > start + limit_s
        if all(c == 0 for c in codes):
            return
        if failed or late:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            tails = "\n".join(f"--- process {i} (exit {p.returncode}) stderr:\n"
                              + (out / f"stderr_{i}.txt").read_text()[-3000:] for i, p in enumerate(procs))
            why = f"did not finish within {limit_s:g} s" if late and not failed else "failed"
            pytest.fail(f"the {len(procs)} worker processes {why}\n{tails}")
        time.sleep(0.1)


def test_two_processes_match_single_process(tmp_path):
    # The weights and the batch, as a checkpoint every process reads (building the model once
    # here rather than in each worker also saves most of their CPU time: Flax's init is slow).
    model, variables, tokens = demo_model(DemoConfig(**CONFIG))
    save_file({dist.path_of(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(variables)},
              str(tmp_path / "variables.safetensors"))
    np.save(tmp_path / "tokens.npy", np.asarray(tokens), allow_pickle=False)
    start = time.monotonic()
    procs = _run_workers(tmp_path)
    try:
        # The single-process reference, computed while the workers run: same model, same
        # pipeline, no sharding, this process's one device.
        optimized = graphopt.optimize(model.apply, params_argnums=0)
        expected = np.asarray(optimized(variables, tokens))
        original = np.asarray(jax.jit(model.apply)(variables, tokens))
    finally:
        _wait(procs, tmp_path, TIME_LIMIT_S, start)

    facts = [json.loads((tmp_path / f"facts_{i}.json").read_text()) for i in range(PROCESSES)]
    for i, f in enumerate(facts):
        assert f["process_index"] == i and f["process_count"] == PROCESSES
        assert f["device_count"] == PROCESSES * CPU_DEVICES and f["local_device_count"] == CPU_DEVICES
    for mode in MODES:
        results = [np.load(tmp_path / f"logits_{mode}_{i}.npy", allow_pickle=False) for i in range(PROCESSES)]
        for f in facts:
            seen = f["modes"][mode]
            # Model parallel: each device holds a quarter of the MLP's up kernel (column split) ...
            assert seen["up_kernel_local_shards"] == [[128, 128]] * CPU_DEVICES, mode
            # ... and data parallel: each process holds its own half of the batch.
            assert seen["batch_local_shards"] == [[CONFIG["batch"] // PROCESSES, CONFIG["seq"]]] * CPU_DEVICES
            assert not seen["logits_fully_addressable"]
            # Megatron: one all-reduce after attention and one after the MLP in each block, which
            # XLA's partitioner inserted: one SPMD program over both processes.
            assert seen["all_reduce_ops"] >= 2 * CONFIG["layers"], mode
        # Both processes gathered the same global array: bit-identical.
        np.testing.assert_array_equal(results[0], results[1])
        assert results[0].shape == expected.shape == (CONFIG["batch"], CONFIG["seq"], 256)
        assert_equivalent(results[0], expected, rtol=RTOL, atol=ATOL,
                          err_msg=f"{mode}: 2 processes x 4 devices vs the single-process optimized model")
        assert_equivalent(results[0], original, rtol=RTOL, atol=ATOL,
                          err_msg=f"{mode}: 2 processes x 4 devices vs the original Flax model")


def _fake_worker(out: Path, i: int, code: str) -> subprocess.Popen:
    with open(out / f"stderr_{i}.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", code], stderr=stderr)


def test_a_failing_worker_stops_its_peer_and_fails_with_the_stderr(tmp_path):
    procs = [_fake_worker(tmp_path, 0, "import sys; sys.stderr.write('no coordinator'); sys.exit(3)"),
             _fake_worker(tmp_path, 1, "import time; time.sleep(60)")]
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"processes failed\n--- process 0 \(exit 3\)[^\n]*\n"
                                                    r"no coordinator"):
        _wait(procs, tmp_path, 30, start)
    assert procs[1].returncode is not None and time.monotonic() - start < 10  # killed, not waited for


def test_workers_past_the_time_limit_are_killed(tmp_path):
    procs = [_fake_worker(tmp_path, i, "import time; time.sleep(60)") for i in range(2)]
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within 0.5 s"):
        _wait(procs, tmp_path, 0.5, start)
    assert all(p.returncode is not None for p in procs) and time.monotonic() - start < 10


# --- the helpers, in this process (its local devices) ---------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "'host:port'"),
    (dict(coordinator_address="127.0.0.1:99999", num_processes=2, process_id=0), "'host:port'"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"0\.\.1"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0), "at least 1"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id="0"), "must be an int"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0, cpu_devices=0),
     "positive int"),
])
def test_initialize_rejects_bad_arguments(kwargs, message):
    with pytest.raises(dist.DistributedError, match=message):
        dist.initialize(**kwargs)
    assert not jax.distributed.is_initialized()


def test_initialize_after_a_computation_says_to_move_it():
    jnp.ones(2).block_until_ready()  # the backend is up: too late to join a cluster
    with pytest.raises(dist.DistributedError, match="must run before anything touches a JAX backend"):
        dist.initialize("127.0.0.1:1234", num_processes=2, process_id=0)
    assert not jax.distributed.is_initialized()


def test_global_mesh_spans_all_devices_with_auto_axes():
    mesh = dist.global_mesh(data=1, model=jax.device_count())
    assert mesh.axis_names == ("data", "model") and mesh.devices.size == jax.device_count()
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(dist.DistributedError, match=f"there are {jax.device_count()}"):
        dist.global_mesh(data=2, model=jax.device_count() + 1)
    with pytest.raises(dist.DistributedError, match="positive ints"):
        dist.global_mesh(data=0)


def test_place_takes_a_spec_a_spec_tree_or_a_function_of_the_path():
    mesh = dist.global_mesh(data=1, model=jax.device_count())
    tree = {"params": {"up": {"kernel": np.arange(8.0).reshape(2, 4), "bias": np.ones(4)}}}
    seen = []

    def spec(path, leaf):
        seen.append(path)
        return P(None, "model") if path.endswith("kernel") else P()

    placed = dist.place(tree, mesh, spec)
    assert sorted(seen) == ["params/up/bias", "params/up/kernel"]
    assert placed["params"]["up"]["kernel"].sharding.spec == P(None, "model")
    by_tree = dist.place(tree, mesh, {"params": {"up": {"kernel": P(None, "model"), "bias": P()}}})
    assert by_tree["params"]["up"]["kernel"].sharding.spec == P(None, "model")
    gathered = dist.gather(placed)  # values unchanged, as NumPy (float32: x64 is off)
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(gathered))
    assert_equivalent(gathered, jax.tree_util.tree_map(lambda x: x.astype(np.float32), tree), exact=True)
    with pytest.raises(dist.DistributedError, match="params/up/kernel: spec .* names axis 'heads'"):
        dist.place(tree, mesh, lambda path, leaf: P("heads") if "kernel" in path else P())
    with pytest.raises(dist.DistributedError, match="must return a jax.sharding.PartitionSpec"):
        dist.place(tree, mesh, lambda path, leaf: None)


def test_specs_that_do_not_divide_the_array_name_the_parameter_and_axis():
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))  # sizes only: no devices needed
    dist._check_spec("params/up/kernel", (128, 512), mesh, P(None, "model"))  # 512 / 4: fine
    with pytest.raises(dist.DistributedError, match=r"params/head/bias: dimension 0 of shape \(6,\) is "
                                                    r"not divisible by 4 \(mesh axes \('model',\)"):
        dist._check_spec("params/head/bias", (6,), mesh, P("model"))
    with pytest.raises(dist.DistributedError, match="not divisible by 8"):
        dist._check_spec("tokens", (4, 16), mesh, P(("data", "model")))
    with pytest.raises(dist.DistributedError, match="has 2 entries but the array has shape"):
        dist._check_spec("params/ln/scale", (128,), mesh, P(None, "model"))


def test_place_local_stacks_process_slices():
    mesh = dist.global_mesh(data=1, model=jax.device_count())
    batch = dist.place_local(np.arange(6).reshape(2, 3), mesh, P("data"))  # one process: its slice is all
    assert batch.shape == (2, 3)
    np.testing.assert_array_equal(dist.gather(batch), np.arange(6).reshape(2, 3))
