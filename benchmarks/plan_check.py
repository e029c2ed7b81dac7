"""mtnlg plan's predictions against measured training steps on this machine (CPU, one thread per rank):

    python benchmarks/plan_check.py --output benchmarks/results/plan_check      # ~10 min on 2 cores

First measures this machine (``mtnlg bench --calibrate``: the ``cpu`` profile), then for each layout of a ~92M GPT-2
(``benchmarks/plan_check_100m.yaml``; tp, pp, dp, micro batch, ZeRO, SP and recompute varied; 1 or 2 ranks)
predicts step time and peak memory per rank with ``mtnlg plan``'s model, times ``--steps`` steps of mtnlg's real
training engine in a fresh worker (after ``--warmup``), and prints the two side by side. The machine is shared:
the ranks' GEMM and memory-bound rates are probed just before and after the timed steps (``mtnlg.bench.calibrate
.probe``, every rank at once) and the prediction uses them, with gloo's bandwidth scaled by the reference GEMM
rate's share of the calibrated one; the prediction at the calibrated rates is in the JSON too. Peak memory measured:
the largest rank's peak of live tensors over a training step (``mtnlg.bench.memory.live_peak``, in a second worker
group so the profiler it needs stays out of the timed steps; what ``max_memory_allocated`` is on a GPU), against
``predict_memory`` (the planner's memory, without its reserved part); the resident set's high-water mark above what
the process held before building the model is in the JSON (it also holds what malloc keeps after a free). Writes
``plan_check.json`` and ``plan_check.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

from mtnlg.bench.calibrate import calibrate
from mtnlg.bench.memory import live_peak
from mtnlg.bench.runner import BenchOptions, bench_config, close_workers, config_variant, start_workers
from mtnlg.config import load_config
from mtnlg.files import write_atomic
from mtnlg.plan.hardware import hardware
from mtnlg.plan.planner import Cluster, Layout, check_layout

# (tp, pp, dp, micro batch, global batch, ZeRO, SP, recompute)
LAYOUTS = [
    (1, 1, 1, 2, 4, 1, False, "none"),
    (1, 1, 1, 1, 4, 1, False, "full"),
    (1, 1, 1, 4, 4, 1, False, "selective"),
    (2, 1, 1, 2, 4, 1, False, "none"),
    (2, 1, 1, 2, 4, 1, True, "selective"),
    (1, 2, 1, 1, 4, 1, False, "none"),
    (1, 2, 1, 2, 8, 1, False, "full"),
    (1, 1, 2, 2, 4, 1, False, "none"),
    (1, 1, 2, 1, 4, 2, False, "full"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="benchmarks/plan_check_100m.yaml")
    ap.add_argument("--output", default="benchmarks/results/plan_check")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--calibration", default=None, help="use this calibration.json instead of measuring")
    args = ap.parse_args(argv)
    # DeepSpeed's shm op per environment, as scripts/setup_env.sh sets it (a cache shared with another environment
    # is rebuilt back and forth, and a rank stopped mid-build leaves a lock every later run waits on)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    cal = Path(args.calibration) if args.calibration else out / "calibration.json"
    if not args.calibration:
        calibrate(out, log=lambda m: print(m, flush=True))
    hw = hardware("cpu", calibration=cal)
    base_cfg = load_config(args.config)
    base = bench_config(BenchOptions(config=args.config))
    rows = []
    for tp, pp, dp, mb, gbs, zero, sp, rc in LAYOUTS:
        world = tp * pp * dp
        layout = Layout(tp, pp, dp, mb, zero, sp, rc)
        pred = check_layout(base_cfg, hw, Cluster(1, world), gbs, layout)
        ds_path = out / f"zero{zero}.json"
        write_atomic(ds_path, json.dumps({"zero_optimization": {"stage": zero}}) + "\n")
        cfg = config_variant(base, world, parallel__tensor=tp, parallel__pipeline=pp, parallel__sequence_parallel=sp,
                             train__micro_batch_size=mb, train__global_batch_size=gbs, model__recompute=rc)
        cfg["deepspeed_config"] = str(ds_path)
        workers = start_workers({"run": (world, 1)}, logs)
        try:
            w = workers["run"]
            info = w.build("mtnlg", cfg)
            w.steps(args.warmup)
            probes = w.call({"op": "probe"})["ranks"]
            timed = w.steps(args.steps)
            probes += w.call({"op": "probe"})["ranks"]
        finally:
            close_workers(workers)
        live = live_peak(cfg, world, args.warmup, logs)
        # the machine is shared: its rates move with the load. The prediction uses the rates the ranks had around the
        # timed steps (every rank probing at once: their contention included): GEMMs at the shaped-GEMM rate, the
        # memory-bound kernels at the probed bandwidth, gloo's collectives scaled by the reference GEMM rate's share
        probe = {k: statistics.median(r[k] for r in probes) for k in probes[0]}
        share = probe["reference_tflops"] / hw.reference_tflops
        hw_now = dataclasses.replace(hw, peak_fp32_tflops=probe["shaped_tflops"], gemm_efficiency=1.0,
                                     memory_gbps=probe["memory_gbps"], intra_node_gbps=hw.intra_node_gbps * share,
                                     inter_node_gbps=hw.inter_node_gbps * share)
        pred_now = check_layout(base_cfg, hw_now, Cluster(1, world), gbs, layout)
        measured_s = statistics.median(timed["times"])
        # CPU seconds of the busiest rank per step: what the step cost without the waits for other jobs' cores (nor
        # for the other rank: a pipeline's bubble and collectives' waits are not in it)
        cpu_s = statistics.median(max(per_rank[i] for per_rank in timed["cpu_s"]) for i in range(len(timed["times"])))
        mem = max(live["peak"]) / 2**20
        rss = max(timed["mem_mb"]) - info["rss_before_build_mb"]
        row = {"layout": layout.label(), "global_batch": gbs, "predicted_s": pred_now.step_time_s,
               "predicted_calibrated_s": pred.step_time_s, "cpu_share": share, "probes": probes,
               "measured_s": measured_s, "times": timed["times"], "cpu_s": timed["cpu_s"], "measured_cpu_s": cpu_s,
               "cpu_error": pred.step_time_s / cpu_s - 1, "calibrated_error": pred.step_time_s / measured_s - 1,
               "time_error": pred_now.step_time_s / measured_s - 1,
               "predicted_mem_mb": pred.memory_bytes / 2**20, "measured_mem_mb": mem,
               "live_peak_mb": [b / 2**20 for b in live["peak"]], "rss_growth_mb": rss,
               "measured_peak_rss_mb": timed["mem_mb"], "rss_before_build_mb": info["rss_before_build_mb"],
               "mem_error": pred.memory_bytes / 2**20 / mem - 1, "breakdown_s": pred_now.time.breakdown()}
        rows.append(row)
        print(f"{layout.label()} gbs={gbs}: step {measured_s:.2f} s measured, {pred_now.step_time_s:.2f} predicted "
              f"(cpu share {share:.2f}; {pred.step_time_s:.2f} at the calibrated rates) "
              f"({100 * row['time_error']:+.0f}%); memory {mem:.0f} MB measured, {row['predicted_mem_mb']:.0f} "
              f"predicted ({100 * row['mem_error']:+.0f}%)", flush=True)
    md = ["| layout | global batch | step s: measured (wall) | CPU s, busiest rank | predicted at the calibrated "
          "rates | error vs wall | vs CPU | rates probed: share | predicted | error vs wall | "
          "peak MB of live tensors | predicted | error |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['layout']} | {r['global_batch']} | {r['measured_s']:.2f} | {r['measured_cpu_s']:.2f} | "
                  f"{r['predicted_calibrated_s']:.2f} | {100 * r['calibrated_error']:+.0f}% | "
                  f"{100 * r['cpu_error']:+.0f}% | {r['cpu_share']:.2f} | {r['predicted_s']:.2f} | "
                  f"{100 * r['time_error']:+.0f}% | {r['measured_mem_mb']:.0f} | {r['predicted_mem_mb']:.0f} | "
                  f"{100 * r['mem_error']:+.0f}% |")
    within = {k: sum(abs(r[k]) <= 0.25 for r in rows) for k in ("calibrated_error", "cpu_error", "time_error")}
    md.append(f"\nstep time within 25%: {within['calibrated_error']} of {len(rows)} at the calibrated rates against "
              f"the wall time, {within['cpu_error']} against the busiest rank's CPU time, {within['time_error']} at "
              f"the probed rates against the wall time; memory within 15%: "
              f"{sum(abs(r['mem_error']) <= 0.15 for r in rows)} of {len(rows)}; cpu profile: {hw}")
    write_atomic(out / "plan_check.md", "\n".join(md) + "\n")
    write_atomic(out / "plan_check.json", json.dumps({"rows": rows, "profile": str(hw)}, indent=1) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
