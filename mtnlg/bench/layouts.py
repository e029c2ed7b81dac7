"""Multi-rank layout timing under a launcher (no parent process), for clusters:

    deepspeed --num_gpus 2 scripts/bench_layouts.py --config RUN.yaml --set parallel.pipeline=2
    torchrun --nproc_per_node 2 scripts/bench_layouts.py --config RUN.yaml --set parallel.tensor=2

Every rank builds mtnlg's Engine for the config's (tp, pp, dp) at each micro-batch count m and
times ``--steps`` steps after ``--warmup``; rank 0 prints a table and writes a JSON. Run it once
with pp = 1 and once with pp = p to get the pipeline efficiency t(1) / (p t(p)) against the ideal
m / (m + p - 1); ``mtnlg bench`` does both itself on one host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch.distributed as dist

from mtnlg.files import write_atomic


def main(argv: list[str] | None = None) -> int:
    from mtnlg.bench.commands import int_list
    from mtnlg.bench.runner import BenchOptions, bench_config, config_variant, throughput
    from mtnlg.bench.setups import MtnlgSetup
    from mtnlg.parallel.distributed import init_distributed
    from mtnlg.training.metrics import peak_memory_mb, reset_peak_memory

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--micro-batches", type=int_list, default=(1, 2, 4, 8))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--output", default="bench_layouts")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = init_distributed()  # (skips DeepSpeed's unused shm op: no /dev/shm buffer)
    world, rank = dist.get_world_size(), dist.get_rank()
    base = bench_config(BenchOptions(config=args.config, overrides=args.overrides))
    rows = []
    for m in args.micro_batches:
        mbs = base["train"]["micro_batch_size"]
        tp, pp = base["parallel"]["tensor"], base["parallel"]["pipeline"]
        dp = world // (tp * pp)
        cfg = config_variant(base, world, train__global_batch_size=m * mbs * dp)
        reset_peak_memory(device)
        setup = MtnlgSetup(cfg, device)
        times = []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            setup.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        mem = [None] * world
        dist.all_gather_object(mem, peak_memory_mb(device))
        info = setup.info()
        row = {"m": m, "layout": info["layout"], "ideal": m / (m + pp - 1), "peak_mem_mb": mem, "times": times,
               **throughput(times, info["tokens_per_step"], info["flops_per_token"], None)}
        rows.append(row)
        if rank == 0:
            print(f"tp={tp} pp={pp} dp={dp} m={m}: step {statistics.median(times):.3f} s median "
                  f"({min(times):.3f} best), {row['tokens_per_s_median']:.0f} tok/s, ideal pipeline efficiency "
                  f"{row['ideal']:.3f}, peak mem MB {[round(x) for x in mem]}", flush=True)
        del setup
    if rank == 0:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        name = f"layouts_tp{tp}_pp{pp}_dp{dp}.json"
        write_atomic(out / name, json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out / name}")
    dist.barrier()
    dist.destroy_process_group()
    return 0
