"""Run a function on N gloo processes on this machine and collect what each rank returns.

    results = run_distributed(fn, world_size=4, args=(...))   # fn(rank, world_size, *args)

``fn`` must be importable (defined at module level). Each rank gets one CPU thread, a
real ``torch.distributed`` gloo process group (initialised through DeepSpeed, as training
does), and the environment variables a launcher would set.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.barrier()
            dist.destroy_process_group()
        queue.put((rank, "ok", pickle.dumps(result)))  # by value, not shared memory
    except BaseException:  # report any failure to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 600) -> list[Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
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
