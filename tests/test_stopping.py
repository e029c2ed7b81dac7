"""Stopping early without changing the run: a stop signal (SIGTERM from a scheduler, SIGUSR1 as a warning) or
train.exit_duration_mins saves a checkpoint at the next step boundary and exits 0, and resuming continues the
uninterrupted loss curve exactly. (train.exit_interval is tested with resume in test_training.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from tests.dist_helper import free_port, run_distributed
from tests.helpers import run_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ITERS = 300

CONFIG = f"""
model: {{architecture: gpt2, num_layers: 2, hidden_size: 32, num_attention_heads: 4, seq_length: 16,
        hidden_dropout: 0.1}}
train: {{iters: {ITERS}, micro_batch_size: 2, global_batch_size: 4, log_interval: 1, peak_tflops: 1.0}}
data: {{synthetic: {{vocab_size: 64, branching: 2}}}}
deepspeed_config: {ROOT / "ds_configs" / "zero1.json"}
"""


def _launch(tmp_path: Path, save: Path, load: bool) -> subprocess.Popen:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(cfg), "--set", f"checkpoint.save={save}"]
    if load:
        cmd += ["--set", f"checkpoint.load={save}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _records(save: Path) -> list[dict]:
    path = save / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    kids = psutil.Process(proc.pid).children(recursive=True)
    return sorted((p for p in kids if any(a.endswith("pretrain_gpt.py") for a in p.cmdline()[1:3])),
                  key=lambda p: p.pid)


def _signal_mid_run(tmp_path: Path, save: Path, load: bool, sig: int, which: slice) -> tuple[int, str, int]:
    """Launch (resuming when ``load``), wait for 3 more logged steps, send ``sig`` to the ranks in ``which``;
    returns (exit status, output, the iteration the run stopped at)."""
    before = len(_records(save))
    proc = _launch(tmp_path, save, load)
    try:
        deadline = time.time() + 300
        while len(_records(save)) < before + 3:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        ranks = _ranks(proc)
        assert len(ranks) == 2
        for p in ranks[which]:
            p.send_signal(sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = max((int(d.name.removeprefix("global_step")) for d in save.glob("global_step*")
                   if (d / "complete").exists()), default=None)  # None: the run saved nothing (its status says why)
    return proc.returncode, out, stopped


def test_a_stop_signal_saves_and_exits_0_and_resuming_continues_exactly(tmp_path):
    """SIGUSR1 to one rank only (the ranks agree to stop together), then, resumed, SIGTERM to both (as a scheduler
    sends it); the third launch finishes. Losses and gradient norms of every iteration equal an uninterrupted run's."""
    save = tmp_path / "ckpt"
    rc, out, first = _signal_mid_run(tmp_path, save, False, signal.SIGUSR1, slice(1, 2))
    assert rc == 0, out[-3000:]
    assert f"stopping after iteration {first} of {ITERS}: a stop signal" in out and first < ITERS
    rc, out, second = _signal_mid_run(tmp_path, save, True, signal.SIGTERM, slice(0, 2))
    assert rc == 0 and f"resumed from iteration {first}" in out, out[-3000:]
    assert first < second < ITERS
    proc = _launch(tmp_path, save, True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and f"resumed from iteration {second}" in out, out[-3000:]

    resumed = {r["iteration"]: (r["loss"], r["grad_norm"]) for r in _records(save)}
    ref_dir = tmp_path / "uninterrupted"
    ref_dir.mkdir()
    proc = _launch(ref_dir, ref_dir / "ckpt", False)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    full = {r["iteration"]: (r["loss"], r["grad_norm"]) for r in _records(ref_dir / "ckpt")}
    assert sorted(resumed) == list(range(1, ITERS + 1)) and resumed == full
    print(f"\nstopped at {first} (SIGUSR1 to one rank) and {second} (SIGTERM), resumed twice: {ITERS} iterations "
          "equal to the uninterrupted run, bit for bit")


def _duration(rank: int, world: int, save: str) -> dict:
    from mtnlg.training.loop import train

    summary = train(run_config("llama", iters=50, save=save, exit_duration_mins=1e-6))
    return {"stopped": summary.stopped, "iterations": summary.iterations, "checkpoint": summary.checkpoint}


def test_exit_duration_saves_and_stops(tmp_path):
    res = run_distributed(_duration, 2, args=(str(tmp_path / "ckpt"),))
    assert res[0] == res[1]  # the ranks agree
    assert res[0]["stopped"] == "train.exit_duration_mins" and res[0]["iterations"] == 1
    assert res[0]["checkpoint"].endswith("global_step1") and (tmp_path / "ckpt" / "global_step1" / "complete").is_file()


def test_a_stopper_off_the_main_thread_warns_that_signals_cannot_stop_it():
    """Python delivers signals to the main thread only: a run started elsewhere says so instead of silently
    ignoring SIGTERM."""
    import threading
    import warnings

    from mtnlg.training.stopping import Stopper

    Stopper.warned = False
    caught: list = []

    def build():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            Stopper(0, 0.0, torch.device("cpu")).close()
            caught.extend(w)

    t = threading.Thread(target=build)
    t.start()
    t.join()
    assert any("outside the main thread" in str(w.message) and "SIGTERM" in str(w.message) for w in caught), caught


def test_only_errors_raised_in_a_collective_read_as_a_lost_host(tmp_path):
    """An error whose text says "timed out" or "Broken pipe" but that no collective raised (a file system, a
    subprocess) keeps its own traceback; a collective's failure becomes the one-line lost-contact report, with the
    original traceback kept in a log it names."""
    import torch.distributed as dist

    from mtnlg.parallel.distributed import comm_failure

    for text in ("Connection timed out", "[Errno 32] Broken pipe", "Timed out waiting for the tokenizer"):
        try:
            raise OSError(text)
        except OSError as e:
            assert comm_failure(e) is None, text
    try:
        raise dist.DistBackendError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                                    "[198.18.0.12]:12345")
    except dist.DistBackendError as e:
        line = comm_failure(e)
    assert line is not None and "\n" not in line and "lost contact" in line
    log = Path(line.rsplit("traceback: ", 1)[1].rstrip(")"))
    assert "DistBackendError" in log.read_text() and "test_stopping.py" in log.read_text()
    log.unlink()
