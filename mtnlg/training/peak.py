"""The peak matmul throughput MFU is measured against.

On CPU it is measured: the best of repeated single GEMMs at a few sizes, with the threads
this process uses. On an accelerator it is the device's nominal dense bf16/fp16 peak.
``gemm_peaks`` is the long form (best and median per size and dtype) that ``mtnlg bench``
reports; ``peak_tflops_per_rank`` the short one the training loop uses.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

# Nominal dense bf16 (fp16 for V100) TFLOP/s per device, by a substring of the device name.
NOMINAL_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10", 125.0), ("L4", 121.0),
    ("V100", 125.0), ("MI300X", 1307.0), ("MI250", 362.0),
]


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize(device)


def measure_gemm(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5,
                 device: torch.device | str = "cpu", budget_s: float | None = None) -> dict[str, float]:
    """TFLOP/s of single square GEMMs (n x n @ n x n): best and median over repeats, at each size.

    Keys: ``best_<n>``, ``median_<n>`` per size, ``best`` (the best of all) and ``median``
    (the median at the size with the best median). Each GEMM writes into a preallocated output,
    so the time is the kernel's, not the allocator's.

    ``budget_s``: stop before a size whose GEMMs (predicted from the last size's rate) would take the measurement
    past this many seconds; the first size is always measured. A CPU without bf16 matrix units runs bf16 GEMMs
    60x slower than fp32 (a 2048^3 one: ~30 s on a quiet core, minutes on a loaded one), and the training loop
    measures on rank 0 while the other ranks wait in their first collective: unbounded, that wait outlasted the
    collective timeout (the "hang" of an 8-rank run on a loaded machine).
    """
    device = torch.device(device)
    result: dict[str, float] = {}
    best_all, best_median = 0.0, 0.0
    start, rate = time.perf_counter(), None
    for n in sizes:
        if budget_s is not None and rate is not None:
            predicted = (repeats + 1) * 2 * n**3 / (rate * 1e12)
            if time.perf_counter() - start + predicted > budget_s:
                break
        gen = torch.Generator(device="cpu").manual_seed(n)
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm up: kernel selection, page faults of the output
        _sync(device)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(device)
            rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e12)
        rate = statistics.median(rates)
        result[f"best_{n}"] = max(rates)
        result[f"median_{n}"] = statistics.median(rates)
        best_all = max(best_all, max(rates))
        best_median = max(best_median, statistics.median(rates))
    result["best"] = best_all
    result["median"] = best_median
    return result


def gemm_peaks(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
               sizes: tuple[int, ...] = (512, 1024, 2048, 4096), repeats: int = 10,
               device: torch.device | str = "cpu", budget_s: float | None = 30.0) -> dict[str, dict[str, float]]:
    """``measure_gemm`` for each dtype ('fp32', 'bf16', ...), plus the threads it ran with; each dtype's
    measurement bounded by ``budget_s`` (larger sizes skipped where they would take longer)."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    out: dict[str, dict[str, float]] = {}
    for dtype in dtypes:
        out[names.get(dtype, str(dtype))] = {**measure_gemm(dtype, sizes, repeats, device, budget_s),
                                             "threads": float(torch.get_num_threads())}
    return out


def nominal_peak_tflops(device: torch.device) -> float | None:
    try:
        name = torch.get_device_module(device.type).get_device_name(device)
    except Exception:  # a backend without device names
        return None
    for key, tflops in NOMINAL_TFLOPS:
        if key in name:
            return tflops
    return None


def peak_tflops_per_rank(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak TFLOP/s one rank can reach: measured on CPU, nominal on an accelerator."""
    if device.type == "cpu":  # at most a few seconds, whatever the CPU's speed in this dtype (see measure_gemm)
        return measure_gemm(dtype, sizes=(256, 512, 1024, 2048), repeats=4, budget_s=3.0)["best"]
    return nominal_peak_tflops(device)


def total_peak_tflops(device: torch.device, dtype: torch.dtype, world: int, local_world: int,
                      per_rank: float | None = None) -> float | None:
    """Peak of the whole job: per-rank peak (given, or measured/nominal) times the ranks that can
    run at once. On CPU, ranks of one host share its cores: at most cores // threads run at full speed."""
    per_rank = per_rank if per_rank is not None else peak_tflops_per_rank(device, dtype)
    if per_rank is None:
        return None
    if device.type != "cpu":
        return per_rank * world
    local_world = max(local_world, 1)
    concurrent = min(local_world, max(1, (os.cpu_count() or 1) // torch.get_num_threads()))
    return per_rank * concurrent * max(world // local_world, 1)
