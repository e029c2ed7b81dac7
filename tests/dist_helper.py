"""Run a function on N gloo processes on this machine and collect what each rank returns.

    results = run_distributed(fn, world_size=4, args=(...))   # fn(rank, world_size, *args)
    results = run_distributed(fn, 4, args=(...), nodes=2, node_dirs={"/tmp/x/ckpt": "/tmp/x/disk{node}"})

``fn`` must be importable (defined at module level). Each rank gets one CPU thread, a
real ``torch.distributed`` gloo process group (initialised through DeepSpeed, as training
does), and the environment variables a launcher would set, on top of the caller's environment and working
directory as they are at the call. Ranks are forked from a server process that has imported torch, DeepSpeed
and mtnlg's training loop once (multiprocessing's forkserver with those modules preloaded): a spawned rank spent
~3 s of CPU importing them, the suite's largest cost on 2 cores.

``nodes``: the ranks are split into that many "nodes" without a shared disk. Each rank enters its own
mount and UTS namespace (root only; ``nodes_supported()`` says whether this machine allows it), takes its
node's hostname (``node0``, ``node1``, ...) and sees, at each path of ``node_dirs``, its node's own
directory (a bind mount): files one node writes there are invisible to the others, as on a cluster
with node-local disks. The network is shared (one machine), which checkpoints do not care about.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parent
# imported once by the fork server; every rank is a fork of it (a fresh process otherwise: nothing has run)
PRELOAD = ["torch", "torch.distributed", "deepspeed", "mtnlg.training.loop"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (the first call of a session)
    return ctx


def ds_config(zero: int, optimizer: str = "adamw") -> str:
    """The DeepSpeed JSON of a ZeRO stage for tests: ``ds_configs/zero{N}.json``, except that ZeRO-3 uses a
    copy with ``stage3_param_persistence_threshold: 0``. DeepSpeed keeps every parameter under that threshold
    (1e5 elements by default) whole on every rank, so without it no tiny test model is ever partitioned.

    ``optimizer="sgd"``: the same with plain SGD (no momentum), written once to a temporary directory."""
    path = TESTS / "zero3_partition_all.json" if zero == 3 else TESTS.parent / "ds_configs" / f"zero{zero}.json"
    if optimizer == "adamw":
        return str(path)
    ds = json.loads(path.read_text())
    ds["optimizer"] = {"type": "SGD", "params": {"momentum": 0.0}}
    out = Path(tempfile.gettempdir()) / "mtnlg-tests" / f"zero{zero}_{optimizer}.json"
    if not out.is_file() or json.loads(out.read_text()) != ds:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_text(json.dumps(ds))
        os.replace(tmp, out)
    return str(out)


PORTS_PER_WORKER = 4000
FIRST_PORT = 12000  # below Linux's ephemeral range (32768-60999): no outgoing connection is ever given one


def free_port() -> int:
    """A free TCP port for a launch's rendezvous (MASTER_PORT). Not one the kernel hands out: a port it chose for
    us (bind to 0) is ephemeral, and the next outgoing connection anywhere on the machine (gloo opens many) may
    take it before the launcher listens on it. Each parallel pytest worker (pytest-xdist: ``gw0``, ``gw1``, ...)
    draws from its own block, so two workers never pick the same one."""
    import random

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    block = FIRST_PORT + PORTS_PER_WORKER * (int(worker[2:]) if worker[2:].isdigit() else 0)
    rng = random.Random()
    for _ in range(200):
        port = block + rng.randrange(PORTS_PER_WORKER)
        with socket.socket() as s:
            try:
                s.bind(("", port))  # as the rendezvous will (all interfaces), not in use nor in TIME_WAIT
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {block}-{block + PORTS_PER_WORKER - 1}")


CLONE_NEWNS, CLONE_NEWUTS, MS_REC, MS_PRIVATE, MS_BIND = 0x00020000, 0x04000000, 0x4000, 1 << 18, 0x1000


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _become_node(node: int, node_dirs: dict[str, str]) -> None:
    """Enter private mount + UTS namespaces: hostname node<i>, and this node's own directory at each path."""
    import ctypes

    libc = _libc()
    if libc.unshare(CLONE_NEWNS | CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS | CLONE_NEWUTS) failed")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # our mounts stay ours
        raise OSError(ctypes.get_errno(), "mount --make-rprivate / failed")
    socket.sethostname(f"node{node}")
    for path, template in node_dirs.items():
        src = Path(template.format(node=node))
        src.mkdir(parents=True, exist_ok=True)
        Path(path).mkdir(parents=True, exist_ok=True)
        if libc.mount(str(src).encode(), str(path).encode(), None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind mount {src} on {path} failed")


def nodes_supported() -> str | None:
    """None when this machine lets a test give processes private mount and UTS namespaces, else why not."""
    if os.geteuid() != 0:
        return "needs root (mount and UTS namespaces)"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_probe_node, args=(queue,))
    proc.start()
    proc.join(60)
    return None if proc.exitcode == 0 else (queue.get() if not queue.empty() else "namespaces not available")


def _probe_node(queue) -> None:
    try:
        _become_node(0, {})
    except OSError as e:
        queue.put(f"cannot make private namespaces here ({e})")
        raise SystemExit(1) from None


def _worker(rank: int, world_size: int, port: int, fn, args, queue, nodes: int = 1,
            node_dirs: dict[str, str] | None = None, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
    per_node = world_size // nodes
    if env is not None:  # the caller's, not the fork server's (started by an earlier test, maybe elsewhere)
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank % per_node),
        WORLD_SIZE=str(world_size), LOCAL_SIZE=str(per_node), OMP_NUM_THREADS="1",
    )
    try:
        if nodes > 1:
            _become_node(rank // per_node, node_dirs or {})
        import torch

        torch.set_num_threads(1)
        import deepspeed
        import torch.distributed as dist

        from mtnlg.deepspeed_compat import skip_shm_comm_op

        skip_shm_comm_op()  # as mtnlg's runs do: no op build, no 67 MB per rank in /dev/shm
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.barrier()
            dist.destroy_process_group()
        queue.put((rank, "ok", pickle.dumps(result)))  # by value, not shared memory
    except BaseException:  # report any failure to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 1200, nodes: int = 1,
                    node_dirs: dict[str, str] | None = None) -> list[Any]:
    if world_size % nodes:
        raise ValueError(f"{world_size} ranks do not split into {nodes} nodes")
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, nodes, node_dirs, env, cwd))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def skip_unless_required(reason: str) -> None:
    """A test that needs what this machine lacks (root, namespaces) fails, saying why: it is never switched off."""
    import pytest

    pytest.fail(f"{reason}; these tests need root and `ip netns` (scripts/setup_system.sh lists what they need)")
