"""Faults: non-finite steps are skipped and stop the run; dead or hung ranks end the job; a save
killed at any moment leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mtnlg.checkpoint.tags import complete_tags, latest_tag
from mtnlg.training.guard import LossWatch
from tests.dist_helper import ds_config, free_port, run_distributed

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _cfg(save: str, zero: int = 1, precision: str = "fp32", tp: int = 1, **train):
    from mtnlg.config import from_dict

    return from_dict({
        "model": {"architecture": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "num_kv_heads": 2, "seq_length": 16},
        "parallel": {"tensor": tp},
        "train": {"iters": 8, "micro_batch_size": 2, "global_batch_size": 4, "log_interval": 1,
                  "precision": precision, "peak_tflops": 1.0, "max_consecutive_nonfinite": 3, **train},
        "data": {"synthetic": {"vocab_size": 64, "branching": 2}},
        "checkpoint": {"save": save, "interval": 1},
        "deepspeed_config": ds_config(zero),
    })


def _explode(rank, world, save, zero, precision, tp):
    from mtnlg.errors import TrainingAborted
    from mtnlg.training.loop import train

    try:
        train(_cfg(save, zero, precision, tp, lr=1e30, min_lr=0.0, warmup_iters=0, lr_decay="constant"))
    except TrainingAborted as e:
        return str(e)
    return "finished"


@pytest.mark.parametrize("world,zero,precision,tp", [
    (1, 0, "fp32", 1),  # mtnlg's guard (DeepSpeed has no check here)
    (2, 1, "fp32", 1),  # DeepSpeed's ZeRO-1 invalid-norm check
    (4, 3, "fp32", 2),  # mtnlg's guard under ZeRO-3 with tp (dp=2: ZeRO-3 partitions)
    (2, 1, "bf16", 1),  # DeepSpeed's BF16 optimizer
    (2, 3, "bf16", 1),  # mtnlg's guard
])
def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, world, zero, precision, tp):
    save = tmp_path / "ckpt"
    messages = run_distributed(_explode, world, args=(str(save), zero, precision, tp))
    assert all("steps in a row had a non-finite loss or gradient" in m for m in messages), messages
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(records[0]["loss"]) and records[0]["skipped"] == 0
    assert records[-1]["skipped"] >= 3  # the exploded steps were not applied
    # every checkpoint written holds finite weights (the save checks); the last one is from before the stop
    tags = complete_tags(save)
    assert tags and tags[-1][0] < records[-1]["iteration"]


def test_guard_verdict_lives_with_the_parameters_and_its_norm_counts_each_gradient_once():
    """The all-reduced verdict is made on the parameters' device (a CPU tensor fails under NCCL); the stage-0 norm
    leaves out a tied weight's copy on a later pipeline stage (DeepSpeed's ``ds_pipe_replicated``)."""
    import torch

    from mtnlg.parallel import ParallelState
    from mtnlg.training.guard import GuardedAdamW, grad_norm

    assert GuardedAdamW([torch.nn.Parameter(torch.empty(2, device="meta"))], lr=1.0)._device().type == "meta"
    a, b, tied = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad, tied.grad = torch.tensor([3.0, 0, 0]), torch.tensor([0, 4.0, 0]), torch.tensor([100.0, 0, 0])
    tied.ds_pipe_replicated = True
    assert grad_norm([a, b, tied], ParallelState.single()) == pytest.approx(5.0)


def test_loss_watch_spikes_and_patience():
    from mtnlg.errors import TrainingAborted

    watch = LossWatch(max_consecutive=2, spike_factor=10.0, precision="bf16")
    for i in range(6):
        assert watch.update(i, 2.0, 1.0, False) is None
    assert "loss spike 30.0000 > 10 x running mean 2.0000" in watch.update(6, 30.0, 1.0, False)
    assert "non-finite loss (nan); step skipped (1 in a row)" in watch.update(7, float("nan"), None, False)
    assert watch.update(8, 2.5, 1.0, False) is None  # a good step resets the count
    watch.update(9, 2.0, float("inf"), True)
    with pytest.raises(TrainingAborted, match="stopping at iteration 10: 2 steps in a row"):
        watch.update(10, float("inf"), None, True)
    fp16 = LossWatch(max_consecutive=1, spike_factor=10.0, precision="fp16")
    assert fp16.update(1, 3.0, float("inf"), True, loss_scale=2.0**16) is None  # loss scaling at work
    with pytest.raises(TrainingAborted):  # ... but not once the scale cannot shrink any more
        fp16.update(2, 3.0, float("inf"), True, loss_scale=1.0)


# ----------------------------------------------------------------------------- dead and hung ranks

CONFIG = """
model: {architecture: gpt2, num_layers: 2, hidden_size: 32, num_attention_heads: 4, seq_length: 16}
train: {iters: 100000, micro_batch_size: 2, global_batch_size: 4, log_interval: 1, peak_tflops: 1.0,
        collective_timeout_s: 15}
data: {synthetic: {vocab_size: 64, branching: 2}}
deepspeed_config: %s
""" % (ROOT / "ds_configs" / "zero1.json")


def _start(tmp_path: Path, launcher: list[str], extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    save = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*launcher, str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(cfg),
           "--set", f"checkpoint.save={save}", *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, save


def _wait_for_iteration(save: Path, proc: subprocess.Popen, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = save / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("training did not start")


def _rank_pids(proc: subprocess.Popen) -> list[int]:
    """The training ranks: processes whose own script (argv[1] or argv[2] after -u) is pretrain_gpt.py."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    return sorted(p.pid for p in kids if any(a.endswith("pretrain_gpt.py") for a in p.cmdline()[1:3]))


def _finish(proc: subprocess.Popen, limit: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not exit within {limit}s") from None
    return proc.returncode, out, time.time() - t0


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_dead_rank_ends_the_job(tmp_path, launcher):
    port = str(free_port())
    cmd = ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port] if launcher == "torchrun"
           else [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port])
    proc, save = _start(tmp_path, cmd)
    _wait_for_iteration(save, proc, 3)
    pids = _rank_pids(proc)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    rc, out, seconds = _finish(proc, 120)
    assert rc != 0
    print(f"{launcher}: job ended {seconds:.1f}s after a rank was killed")
    # DeepSpeed's shm all-reduce op (67 MB per rank in /dev/shm, never removed) is not started: a killed job
    # leaves no buffer
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_a_hung_rank_times_out_with_a_clear_message(tmp_path):
    proc, save = _start(tmp_path, [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                                   str(free_port())])
    _wait_for_iteration(save, proc, 3)
    pids = _rank_pids(proc)
    os.kill(pids[-1], signal.SIGSTOP)  # alive but silent: only a timeout can notice
    try:
        rc, out, seconds = _finish(proc, 180)
    finally:
        for pid in pids:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
    assert rc != 0
    assert "lost contact with the other ranks" in out, out[-3000:]
    print(f"hung rank: job ended {seconds:.1f}s after the rank stopped")


# ----------------------------------------------------------------------------- crash-safe checkpoints


def test_killed_saves_leave_the_previous_checkpoint_loadable(tmp_path):
    """SIGKILL the run while a checkpoint is half written (every shard on disk, no marker yet: the fault point
    ``MTNLG_FAULT_KILL_BEFORE_MARKER``), three times at chosen iterations; each resume picks the newest complete
    checkpoint and the run finishes."""
    from mtnlg.checkpoint.saver import FAULT_ENV

    cfg = tmp_path / "run.yaml"
    save = tmp_path / "ckpt"
    cfg.write_text(CONFIG.replace("iters: 100000", "iters: 40"))
    cmd = [str(BIN / "mtnlg"), "train", "--config", str(cfg), "--set", f"checkpoint.save={save}",
           "--set", f"checkpoint.load={save}", "--set", "checkpoint.interval=1"]
    for kill_at in (3, 5, 9):
        env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_ENV: str(kill_at)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
        half = save / f"global_step{kill_at}"
        assert half.is_dir() and any(half.glob("*.pt")) and not (half / "complete").exists()  # killed mid-save
        newest = latest_tag(save)
        assert newest == f"global_step{kill_at - 1}" and (save / newest / "complete").is_file()
        assert (save / "latest").read_text() == newest
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no fault this time
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert "resumed from iteration" in final.stdout
    assert latest_tag(save) == "global_step40"


def _keep_last(rank, world, save):
    from mtnlg.training.loop import train

    cfg = _cfg(save)
    cfg.checkpoint.keep_last = 2
    train(cfg)


def test_keep_last_prunes_only_complete_older_checkpoints(tmp_path):
    save = tmp_path / "ckpt"
    run_distributed(_keep_last, 1, args=(str(save),))
    assert [t for _, t in complete_tags(save)] == ["global_step7", "global_step8"]
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step7", "global_step8"]
