"""Collective bandwidth between ranks (gloo on a CPU, NCCL on GPUs), for ``mtnlg bench --calibrate``:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m mtnlg.bench.comm OUT.json

Every rank times all-reduce, all-gather and reduce-scatter of 64 KiB to 64 MiB (fp32) per rank, and sends from
rank 0 to 1. Rank 0 writes the median time of each; the fit of the ring model t = steps * latency + moved /
bandwidth to the all-reduces, to the all-gathers and reduce-scatters together, and to the sends (moved: the bytes
each rank sends, 2 (p - 1) / p n for an all-reduce, (p - 1) / p n for the others); and its own resident memory
after start-up (what a rank holds before any model: the planner's ``reserved`` memory on a CPU).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mtnlg.training.metrics import current_rss_mb

SIZES = (2**16, 2**20, 2**22, 2**24, 2**26)


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(device: torch.device, repeats: int = 5) -> dict:
    from mtnlg.training.peak import measure_gemm

    p, rank = dist.get_world_size(), dist.get_rank()
    base_rss = current_rss_mb()
    refs = [measure_gemm(torch.float32, sizes=(1024,), repeats=3)["median"]]
    rows = []
    for n in SIZES:
        rows += _sizes(n, p, rank, device, repeats)
    refs.append(measure_gemm(torch.float32, sizes=(1024,), repeats=3)["median"])
    fits = {}
    for name, ops in (("all_reduce", {"all_reduce"}), ("gather_scatter", {"all_gather", "reduce_scatter"}),
                      ("p2p", {"p2p"})):
        sel = [r for r in rows if r["op"] in ops]
        latency, inv_bw = _fit([(r["steps"], r["moved"]) for r in sel], [r["s"] for r in sel])
        fits[name] = {"latency_us": 1e6 * latency, "gbps": 1e-9 / inv_bw}
    return {"ranks": p, "rows": rows, "fits": fits, "rank_rss_mb": base_rss,
            "reference_tflops": statistics.mean(refs)}  # this rank's fp32 GEMM rate around the timings


def _sizes(n: int, p: int, rank: int, device: torch.device, repeats: int) -> list[dict]:
    """The four operations on ``n`` bytes per rank."""
    x = torch.ones(n // 4, device=device)
    parts = [torch.empty_like(x) for _ in range(p)]
    big = torch.ones(p * (n // 4), device=device)
    out = torch.empty(n // 4, device=device)

    def p2p() -> None:
        if rank == 0:
            dist.send(x, 1)
        elif rank == 1:
            dist.recv(x, 0)

    return [{"op": "all_reduce", "bytes": n, "steps": 2 * (p - 1), "moved": 2 * (p - 1) / p * n,
             "s": _time(lambda: dist.all_reduce(x), repeats)},
            {"op": "all_gather", "bytes": n * p, "steps": p - 1, "moved": (p - 1) * n,
             "s": _time(lambda: dist.all_gather(parts, x), repeats)},
            {"op": "reduce_scatter", "bytes": n * p, "steps": p - 1, "moved": (p - 1) * n,
             "s": _time(lambda: dist.reduce_scatter_tensor(out, big), repeats)},
            {"op": "p2p", "bytes": n, "steps": 1, "moved": n, "s": _time(p2p, repeats)}]


def _fit(x: list[tuple[float, float]], y: list[float]) -> tuple[float, float]:
    """Least squares t = a * steps + b * moved (a, b >= 0)."""
    a_ = torch.tensor(x, dtype=torch.float64)
    sol = torch.linalg.lstsq(a_, torch.tensor(y, dtype=torch.float64)[:, None]).solution[:, 0]
    a, b = (max(float(v), 1e-12) for v in sol)
    return a, b


def main() -> int:
    from mtnlg.parallel.distributed import init_distributed

    out = Path(sys.argv[1])
    device = init_distributed()
    result = measure(device)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
