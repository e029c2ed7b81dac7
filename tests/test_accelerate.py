"""The design card's packages (issue 26, section 5): ``accelerate`` is a dependency, so lm-evaluation-harness's
``hf`` model runs on an mtnlg export, and ``accelerate launch`` is a third launcher of scripts/pretrain_gpt.py
beside ``deepspeed`` and ``torchrun`` (docs/launchers.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtnlg.cli import main
from tests.dist_helper import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three", "sun", "moon", "star"]


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict:
    """This process's environment without the rank variables an in-process `mtnlg train` leaves in it."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_lm_eval_hf_model_runs_on_an_export(tmp_path, capsys):
    """`lm_eval --model hf --model_args pretrained=EXPORT_DIR` (was: ModuleNotFoundError: accelerate) gives the
    perplexity `mtnlg evaluate --hf` gives on the same local LAMBADA-style data."""
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import train_tokenizer

    docs = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) for i in range(200)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer(docs, vocab_size=300, output_dir=tmp_path / "tok")
    preprocess([str(tmp_path / "docs.jsonl")], "text", tok, str(tmp_path / "docs"), workers=1, log=lambda *_: None)
    (tmp_path / "run.yaml").write_text(
        "model: {architecture: gpt2, num_layers: 2, hidden_size: 32, num_attention_heads: 4, seq_length: 32}\n"
        "train: {iters: 4, micro_batch_size: 2, global_batch_size: 2, log_interval: 4, peak_tflops: 1.0}\n"
        f"data: {{prefix: {tmp_path}/docs, tokenizer: {tmp_path}/tok}}\n"
        f"deepspeed_config: {ROOT / 'ds_configs' / 'zero0.json'}\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--set", f"checkpoint.save={tmp_path}/ckpt"]) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    (tmp_path / "cloze.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:6]))
    assert main(["evaluate", "--hf", str(tmp_path / "hf"), "--task", "cloze", "--data", str(tmp_path / "cloze.jsonl"),
                 "--device", "cpu", "--output", str(tmp_path / "native.json")]) == 0
    capsys.readouterr()
    native = json.loads((tmp_path / "native.json").read_text())

    spec = yaml.safe_load((ROOT / "examples" / "eval" / "lambada_local.yaml").read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "cloze.jsonl")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lambada_local.yaml").write_text(yaml.safe_dump(spec))
    cmd = [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf'}", "--device", "cpu",
           "--tasks", "lambada_local", "--include_path", str(tmp_path / "tasks"), "--batch_size", "2",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["lambada_local"]
    assert results["perplexity,none"] == pytest.approx(native["perplexity"], rel=1e-4)
    assert results["acc,none"] == pytest.approx(native["accuracy"])


CONFIG = """
model: {architecture: llama, num_layers: 4, hidden_size: 32, num_attention_heads: 4, num_kv_heads: 2,
        vocab_size: 64, seq_length: 16}
parallel: {tensor: 2, pipeline: 2}
train: {iters: 3, micro_batch_size: 2, global_batch_size: 4, log_interval: 1, peak_tflops: 1.0}
data: {synthetic: {branching: 2}}
deepspeed_config: %s
""" % (ROOT / "ds_configs" / "zero1.json")


def _records(save: Path) -> list[dict]:
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def test_accelerate_launch_gives_the_single_process_losses_at_tp2_pp2(tmp_path, capsys):
    """`accelerate launch --multi_gpu --num_processes 4` (torch's elastic agent underneath: RANK, WORLD_SIZE,
    MASTER_ADDR/PORT set for deepspeed.init_distributed) runs scripts/pretrain_gpt.py at tp 2 x pp 2 on CPU/gloo; its
    losses and gradient norms equal the one-process tp 1 x pp 1 run's."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "4", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "scripts" / "pretrain_gpt.py"), "--config", str(cfg), "--set", f"checkpoint.save={tmp_path}/acc"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "layout: tp=2 pp=2 dp=1" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "acc" / "global_step3" / "mp_rank_03_model_states.pt").is_file()  # four (pp, tp) shards
    launched = _records(tmp_path / "acc")

    assert main(["train", "--config", str(cfg), "--set", "parallel.tensor=1", "--set", "parallel.pipeline=1",
                 "--set", f"checkpoint.save={tmp_path}/one"]) == 0
    capsys.readouterr()
    single = _records(tmp_path / "one")
    assert [r["iteration"] for r in launched] == [r["iteration"] for r in single] == [1, 2, 3]
    for a, b in zip(launched, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
