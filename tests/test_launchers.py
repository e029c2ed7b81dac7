"""Each launcher starts a real 2-process run of scripts/pretrain_gpt.py on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_helper import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

CONFIG = """
model: {architecture: llama, num_layers: 2, hidden_size: 32, num_attention_heads: 4, num_kv_heads: 2,
        vocab_size: 64, seq_length: 16}
parallel: {tensor: 2}
train: {iters: 3, micro_batch_size: 2, global_batch_size: 4, log_interval: 1, peak_tflops: 1.0}
data: {synthetic: {branching: 2}}
deepspeed_config: %s
""" % (ROOT / "ds_configs" / "zero1.json")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], tmp_path: Path, extra: list[str] = ()) -> list[dict]:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    save = tmp_path / "ckpt"
    full = [*cmd, str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(cfg), "--set", f"checkpoint.save={save}",
            *extra]
    proc = subprocess.run(full, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert (save / "global_step3" / "complete").is_file()
    assert (save / "global_step3" / "mp_rank_01_model_states.pt").is_file()  # tp=2: two model shards
    return records


def test_deepspeed_launcher(tmp_path):
    _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())], tmp_path)


def test_torchrun(tmp_path):
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], tmp_path)


# (DeepSpeed's "... built successfully" of its shm op is gone with the op: mtnlg skips it on CPU)
DEEPSPEED_CHATTER = ["Using topology", "SEED_LAYERS", "CPU Virtual Memory", "begin bf16_optimizer",
                     "untested optimizer"]


@pytest.mark.parametrize("show", [False, True])
def test_defaults_work_for_pipelines_and_bf16_without_deepspeed_chatter(tmp_path, show):
    """No DeepSpeed JSON: a tied gpt2 at pp=2 in bf16 trains (the default is ZeRO-1); DeepSpeed's set-up prints are
    kept off the console unless logging.deepspeed is info."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("architecture: llama", "architecture: gpt2").replace(" num_kv_heads: 2,", "")
                   .replace("parallel: {tensor: 2}", "parallel: {pipeline: 2}").split("deepspeed_config:")[0])
    save = tmp_path / "ckpt"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(cfg), "--set", "train.precision=bf16",
           "--set", f"checkpoint.save={save}", "--set", f"logging.deepspeed={'info' if show else 'quiet'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (save / "global_step3" / "complete").is_file()
    seen = [c for c in DEEPSPEED_CHATTER if c in out]
    if show:
        assert {"Using topology", "begin bf16_optimizer"} <= set(seen), out[-3000:]
    else:
        assert seen == [], out[-3000:]


@pytest.mark.parametrize("args,message", [
    (["--set", "train.precision=bf16", "--set", "deepspeed_config=ds_configs/zero0.json"],
     "bf16 needs ZeRO stage >= 1"),  # a config error: every rank raises it
    (["--set", "checkpoint.load=runs/none"], "holds no complete checkpoint"),  # rank 0 checks, all agree
])
def test_user_errors_are_printed_once_per_job(tmp_path, args, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(cfg), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "mtnlg train: error:" in line]
    assert len(lines) == 1 and message in lines[0], proc.stdout[-2000:] + proc.stderr[-2000:]


def test_deepspeed_hostfile_on_localhost(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    _run([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
          "--master_port", str(free_port())], tmp_path)


def test_single_process_cli_and_losses_match_launchers(tmp_path):
    """`mtnlg train` at tp=1 (one process) gives the same first loss as the 2-rank tp=2 launch."""
    (tmp_path / "a").mkdir()
    cfg = tmp_path / "a" / "run.yaml"
    cfg.write_text(CONFIG)
    save = tmp_path / "a" / "ckpt"
    proc = subprocess.run([str(BIN / "mtnlg"), "train", "--config", str(cfg), "--set", "parallel.tensor=1",
                           "--set", f"checkpoint.save={save}"], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [json.loads(line)["loss"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    (tmp_path / "b").mkdir()
    two = [r["loss"] for r in _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                                     str(free_port())], tmp_path / "b")]
    assert max(abs(a - b) / b for a, b in zip(single, two)) < 1e-5


@pytest.mark.parametrize("args,message", [
    (["--set", "parallel.pipeline=2"], "world size 1 is not divisible by parallel.tensor * parallel.pipeline = 2"),
    (["--set", "deepspeed_config=/nonexistent.json"], "deepspeed_config /nonexistent.json not found"),
    (["--set", "data.synthetic.vocab_size=100"], "model.vocab_size = 64 is smaller than data.synthetic.vocab_size 100"),
    (["--set", "train.precision=bf16", "--set", "deepspeed_config=ds_configs/zero0.json"],
     "bf16 needs ZeRO stage >= 1"),
    (["--set", "trian.iters=3"], "unknown key 'trian'"),
    (["--set", "data.synthetic=null", "--set", "data.tokenizer=tok"],
     "data.tokenizer is set but there is no data.prefix"),
])
def test_train_bad_input_one_line(tmp_path, args, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.replace("parallel: {tensor: 2}", "parallel: {tensor: 1}"))
    proc = subprocess.run([str(BIN / "mtnlg"), "train", "--config", str(cfg), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], proc.stderr


def test_the_cli_leaves_the_hugging_face_hub_setting_to_the_user():
    """mtnlg reads local files offline where it reads local files (``local_files_only``), but does not switch the hub
    off for the whole process: lm-eval tasks a GPU-cluster user downloads must still download."""
    code = ("import os; from mtnlg.cli import main; main(['model-info', '--set', 'model.vocab_size=100']); "
            "print('HF_HUB_OFFLINE=' + str(os.environ.get('HF_HUB_OFFLINE')))")
    env = {k: v for k, v in _env().items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HF_HUB_OFFLINE=None" in proc.stdout
