"""``mtnlg bench --calibrate``: the figures of this machine that ``mtnlg plan --gpu cpu`` needs, measured for one
rank of one thread (the CPU planner's "GPU" is a rank on one core):

- GEMM peak: the best square GEMM (fp32 and bf16; ``mtnlg.training.peak``), and the rate of GEMMs shaped like a
  small transformer's ((T, h) @ (h, 3h), (h, 4h), (4h, h), (h, h)): their ratio is the GEMM efficiency;
- memory-bound kernels: forward + backward of a one-block GPT (mtnlg's own model) minus its GEMM time at the rate
  just measured, per byte the block keeps for backward (the planner's traffic model, ``mtnlg.plan.cost``,
  inverted: the bandwidth that makes it exact for this block);
- collectives: gloo all-reduce / all-gather / reduce-scatter and send/recv between 2 ranks (``mtnlg.bench.comm``),
  fitted to latency + bytes / bandwidth (all-reduce: the link bandwidth; gloo's all-gather and reduce-scatter move
  fewer bytes per second: their slowdown);
- the resident memory of a rank before it builds a model (the planner's reserved memory on a CPU).

The machine may be shared: each figure is measured next to a reference GEMM rate (``reference_tflops``) and
scaled to the first one, so that they describe one machine state; ``benchmarks/plan_check.py`` probes the same rate
around each timed run and scales the profile to it.

Writes ``calibration.json``: ``profile`` (what ``mtnlg plan --calibration FILE`` reads) and ``measurements``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtnlg.files import write_atomic

REFERENCE_N = 1024  # the reference rate: median of single 1024^3 fp32 GEMMs, one thread (the bench worker's probe)
TRAFFIC = 5.0  # bytes moved per byte kept for backward, forward + backward (mtnlg.plan.cost: TRAFFIC_FWD + _BWD)


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def reference_tflops() -> float:
    """This process's fp32 GEMM rate now. On a shared machine other jobs take a varying share of the cores; each
    figure below is measured next to this rate and scaled to the first one, so the profile is in one unit."""
    from mtnlg.training.peak import measure_gemm

    return measure_gemm(torch.float32, sizes=(REFERENCE_N,), repeats=3)["median"]


def shaped_gemm_rate(dtype: torch.dtype, tokens: int = 1024, hidden: int = 768, repeats: int = 5) -> float:
    """FLOP/s of a transformer block's four GEMM shapes together (best time of each)."""
    total_flops, total_s = 0.0, 0.0
    for k, n in ((hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)):
        a = torch.randn(tokens, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        out = torch.empty(tokens, n, dtype=dtype)
        total_s += _best(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), repeats)
        total_flops += 2.0 * tokens * k * n
    return total_flops / total_s


def block_memory_gbps(precision: str, gemm_rate: float, repeats: int = 5) -> dict[str, float]:
    """Bandwidth (GB/s) that makes the planner's memory-bound time exact for a one-block GPT's forward + backward."""
    from mtnlg.config import from_dict, resolve
    from mtnlg.model.flops import flops_per_token
    from mtnlg.model.registry import family
    from mtnlg.training.memory import attention_kind, head_activation_bytes, layer_activation_bytes

    raw = {"model": {"architecture": "gpt2", "num_layers": 1, "hidden_size": 512, "num_attention_heads": 8,
                     "seq_length": 512, "vocab_size": 512},
           "train": {"micro_batch_size": 2, "precision": precision}}
    cfg = resolve(from_dict(raw), 1)
    m, b = cfg.model, cfg.train.micro_batch_size
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = family(m).model(m).to(dtype)
    ids = torch.randint(0, m.vocab_size, (b, m.seq_length))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).backward()

    seconds = _best(step, repeats)
    gemm_s = flops_per_token(m) * b * m.seq_length / gemm_rate
    kept = (layer_activation_bytes(m, b, 1, False, precision, attention_kind(m, precision, "cpu"), "cpu")
            + head_activation_bytes(m, b, 1, False, precision, "cpu"))
    memory_s = max(seconds - gemm_s, 1e-6)
    return {"step_s": seconds, "gemm_s": gemm_s, "kept_bytes": kept, "memory_gbps": TRAFFIC * kept / memory_s / 1e9}


def probe() -> dict[str, float]:
    """This process's rates now, one thread: the reference GEMM, the shaped GEMMs (fp32 TFLOP/s) and the
    memory-bound bandwidth of the one-block GPT (GB/s). ``benchmarks/plan_check.py`` takes them around each timed
    run, so that a prediction uses the rates its run had (the machine is shared)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = reference_tflops()
        shaped = shaped_gemm_rate(torch.float32)
        block = block_memory_gbps("fp32", shaped)
    finally:
        torch.set_num_threads(saved)
    return {"reference_tflops": ref, "shaped_tflops": shaped / 1e12, "memory_gbps": block["memory_gbps"]}


def comm(ranks: int = 2) -> dict:
    """``mtnlg.bench.comm`` on ``ranks`` processes of one thread each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "mtnlg.bench.comm", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode or not out.is_file():
            raise RuntimeError(f"collective benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def _host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def calibrate(output: str | Path, log=print) -> dict:
    """Measure, write ``output/calibration.json``, return it."""
    from mtnlg.training.peak import measure_gemm

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log("calibrate: GEMM peaks, 1 thread")
        ref = reference_tflops()
        peaks = {name: measure_gemm(dt, sizes=(512, 1024, 2048), repeats=6)
                 for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        shaped = {name: shaped_gemm_rate(dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        scale_peaks = ref / reference_tflops()  # back to the first reference's unit
        for name in peaks:
            peaks[name] = {k: v * scale_peaks for k, v in peaks[name].items()}
            shaped[name] *= scale_peaks
        log("calibrate: memory-bound kernels of a one-block GPT (fp32), 1 thread")
        before = reference_tflops()
        block = block_memory_gbps("fp32", shaped["fp32"] * before / ref)
        scale_block = ref / statistics.mean([before, reference_tflops()])
        block["memory_gbps"] *= scale_block
    finally:
        torch.set_num_threads(saved)
    log("calibrate: gloo collectives between 2 ranks")
    links = comm(2)
    fits = links["fits"]
    scale_comm = ref / links["reference_tflops"]
    for fit in fits.values():
        fit["gbps"] *= scale_comm
    profile = {
        "peak_fp32_tflops": peaks["fp32"]["best"],
        "peak_bf16_tflops": peaks["bf16"]["best"],
        "gemm_efficiency": min(1.0, shaped["fp32"] / 1e12 / peaks["fp32"]["best"]),
        "memory_gbps": block["memory_gbps"],
        "intra_node_gbps": fits["all_reduce"]["gbps"], "inter_node_gbps": fits["all_reduce"]["gbps"],
        "gather_scatter_slowdown": max(1.0, fits["all_reduce"]["gbps"] / fits["gather_scatter"]["gbps"]),
        "latency_us": fits["all_reduce"]["latency_us"],
        "reserved_gib": links["rank_rss_mb"] / 1024,
        "memory_gib": _host_memory_gib() / (os.cpu_count() or 1),  # a rank per core shares the host's memory
        "reference_tflops": ref,
    }
    result = {"profile": profile,
              "measurements": {"gemm_peak_1thread": peaks,
                               "shaped_gemm_tflops": {k: v / 1e12 for k, v in shaped.items()},
                               "block_fp32": block, "comm": links,
                               "scales_to_reference": {"peaks": scale_peaks, "block": scale_block, "comm": scale_comm},
                               "bf16_gemm_efficiency": shaped["bf16"] / 1e12 / peaks["bf16"]["best"]},
              "command": "mtnlg bench --calibrate", "date": time.strftime("%Y-%m-%d"),
              "machine": {"cores": os.cpu_count(), "torch": torch.__version__}}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "calibration.json", json.dumps(result, indent=1) + "\n")
    log("calibrate: " + ", ".join(f"{k} {v:.4g}" for k, v in profile.items()))
    log(f"calibrate: wrote {out / 'calibration.json'}")
    return result
