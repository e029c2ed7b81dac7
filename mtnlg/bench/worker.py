"""A benchmark worker: one process group that builds a training setup and times its steps on command.

``mtnlg bench`` starts one worker per setup it compares (mtnlg, each HF peer variant, a 2-rank pipeline,
...) and drives them turn by turn, so their steps interleave in time and machine drift cancels:

    python -m mtnlg.bench.worker                                              # one rank
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m mtnlg.bench.worker

The parent listens on MTNLG_BENCH_ADDR (host:port, auth key MTNLG_BENCH_KEY in hex). Rank 0
connects, receives each command and broadcasts it to the other ranks; every rank executes it;
rank 0 sends the answer back. Commands (dicts):

- ``{"op": "build", "kind": "mtnlg"|"peer", "config": RUN_CONFIG_DICT, "optimizer": {...}, "attn": "eager"|"sdpa"}``
  -> info (``optimizer``: the AdamW flags the peer matches; ``attn``: the peer's attention)
- ``{"op": "steps", "n": N, "reset_peak": bool}`` -> ``{"times": [seconds per step], "loss": last loss,
  "mem_mb": [per rank], "cpu_s": [per rank: [CPU seconds of each step]]}`` (the peak since the build, or with
  ``reset_peak`` since these steps began; on a shared machine, CPU / wall time is the share a rank got)
- ``{"op": "probe"}`` -> ``{"ranks": [mtnlg.bench.calibrate.probe() of each rank]}``: the GEMM and memory-bound
  rates the ranks get now, all measuring at once
- ``{"op": "rss"}`` -> ``{"mb": [per rank]}``: the resident set before the setup was built
- ``{"op": "tensor_peak"}`` -> ``{"start", "peak", "before": [per rank]}``: live tensor bytes when one more step
  begins, their peak during it, and their peak before it (``mtnlg.bench.memory.TensorMemory``; the build must
  have had ``"tensor_memory": true``)
- ``{"op": "activations"}`` -> ``{"bytes", "blocks_bytes": [per rank]}``: bytes autograd keeps over one micro
  batch's forward, all and inside the transformer blocks
- ``{"op": "exit"}``

Peak memory is per rank and per setup: the device allocator's peak on an accelerator, the
resident-set high-water mark on CPU (reset before each build where Linux allows it).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from multiprocessing.connection import Client

import torch
import torch.distributed as dist

from mtnlg.training.metrics import current_rss_mb, peak_memory_mb, reset_peak_memory


def _run(conn, device: torch.device) -> None:
    from mtnlg.bench.setups import build

    setup = tensor_memory = None
    rank = dist.get_rank()
    while True:
        box = [conn.recv() if rank == 0 else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        cmd = box[0]
        op = cmd["op"]
        if op == "exit":
            return
        try:
            if op == "build":
                setup = None
                gc.collect()
                reset_peak_memory(device)
                if cmd.get("tensor_memory"):
                    from mtnlg.bench.memory import TensorMemory

                    tensor_memory = TensorMemory()
                before = current_rss_mb() if device.type == "cpu" else None  # what the process held before the model
                setup = build(cmd["kind"], cmd["config"], device, cmd.get("optimizer"), cmd.get("attn"))
                answer = {"ok": True, "info": {**setup.info(), "rss_before_build_mb": before}}
            elif op == "steps":
                if cmd.get("reset_peak"):  # the peak of these steps only, not of building the setup
                    gc.collect()
                    reset_peak_memory(device)
                times, cpu, loss = [], [], None
                for _ in range(int(cmd["n"])):
                    if dist.get_world_size() > 1:
                        dist.barrier()  # every rank starts the step together
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss = setup.step()  # returns a float: the step has finished on this rank
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                mem = [None] * dist.get_world_size()
                dist.all_gather_object(mem, peak_memory_mb(device))
                cpus = [None] * dist.get_world_size()
                dist.all_gather_object(cpus, cpu)
                answer = {"ok": True, "times": times, "loss": loss, "mem_mb": mem, "cpu_s": cpus}
            elif op == "probe":  # this process group's rates now (on a shared machine they move with the load)
                from mtnlg.bench.calibrate import probe

                rates = [None] * dist.get_world_size()
                dist.all_gather_object(rates, probe())
                answer = {"ok": True, "ranks": rates}
            elif op == "rss":  # each rank's resident set before its setup was built
                rss = [None] * dist.get_world_size()
                dist.all_gather_object(rss, setup.rss_before_build_mb)
                answer = {"ok": True, "mb": rss}
            elif op == "tensor_peak":  # live tensor bytes over one more step (a build with "tensor_memory")
                peaks = [None] * dist.get_world_size()
                dist.all_gather_object(peaks, tensor_memory.peak_of(setup.step))
                tensor_memory = None
                answer = {"ok": True, "start": [p[0] for p in peaks], "peak": [p[1] for p in peaks],
                          "before": [p[2] for p in peaks]}
            elif op == "activations":
                saved = [None] * dist.get_world_size()
                dist.all_gather_object(saved, setup.saved_activation_bytes())
                answer = {"ok": True, "bytes": [s[0] for s in saved], "blocks_bytes": [s[1] for s in saved]}
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception:  # report to the parent, which shows it and stops
            answer = {"ok": False, "error": f"rank {rank}:\n{traceback.format_exc()}"}
            if dist.get_world_size() > 1:  # a rank that failed alone would leave the others waiting
                print(answer["error"], file=sys.stderr, flush=True)
                os._exit(1)
        if rank == 0:
            conn.send(answer)


def main() -> int:
    import warnings

    from mtnlg.parallel.distributed import init_distributed

    if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # as the mtnlg CLI does
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    host, port = os.environ["MTNLG_BENCH_ADDR"].rsplit(":", 1)
    key = bytes.fromhex(os.environ["MTNLG_BENCH_KEY"])
    device = init_distributed()  # (skips DeepSpeed's unused shm op: no /dev/shm buffer)
    conn = Client((host, int(port)), authkey=key) if dist.get_rank() == 0 else None
    try:
        _run(conn, device)
    finally:
        if conn is not None:
            conn.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
