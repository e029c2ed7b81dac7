"""Mixed precision: bf16 and fp16 reach the synthetic source's entropy; fp16 overflows are skipped and counted;
metrics.jsonl and TensorBoard get every field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist_helper import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def _config(precision: str, iters: int, save: str | None, ds: str = str(ROOT / "ds_configs" / "zero1.json"),
            train: dict | None = None, **extra):
    from mtnlg.config import from_dict

    return from_dict({
        "model": {"architecture": "llama", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "vocab_size": 64, "seq_length": 32},
        "train": {"iters": iters, "micro_batch_size": 16, "global_batch_size": 16, "lr": 1e-2, "min_lr": 1e-3,
                  "log_interval": 25, "eval_interval": iters, "eval_iters": 8,
                  "precision": precision, "peak_tflops": 1.0, "warmup_iters": min(20, iters), **(train or {})},
        "data": {"synthetic": {"branching": 4, "seed": 0}},
        "checkpoint": {"save": save},
        "deepspeed_config": ds,
        **extra,
    })


CONVERGE_ITERS = 150  # validation loss 1.049 x the entropy at 150 steps, 1.034 at 250 (both precisions, lr 1e-2)


def _converge(rank, world, precision, save):
    from mtnlg.data.synthetic import MarkovSource
    from mtnlg.training.loop import train

    summary = train(_config(precision, CONVERGE_ITERS, save))
    entropy = MarkovSource(64, 4, 32, 0).entropy
    return {"val": summary.val_losses[CONVERGE_ITERS], "entropy": entropy, "skipped": summary.skipped,
            "first": summary.losses[1]}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_reaches_entropy(tmp_path, precision):
    r = run_distributed(_converge, 1, args=(precision, str(tmp_path / "ckpt")))[0]
    print(f"{precision}: val loss {r['val']:.4f}, entropy {r['entropy']:.4f}, first loss {r['first']:.3f}")
    assert r["first"] > 1.5 * r["entropy"]
    assert r["val"] < 1.10 * r["entropy"]
    assert r["val"] > 0.95 * r["entropy"]  # no model beats the source's entropy (up to sampling noise)


def _overflow(rank, world, save, ds):
    from mtnlg.training.loop import train

    summary = train(_config("fp16", 12, save, ds=ds))  # logs at 1 and 12 (log_interval 25)
    return {"skipped": summary.skipped, "losses": summary.losses}


def test_fp16_overflow_steps_are_skipped_and_logged(tmp_path):
    ds = tmp_path / "fp16.json"
    # a loss scale of 2^40 overflows fp16 gradients until the dynamic scaler has halved it enough
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1},
                              "fp16": {"loss_scale": 0, "initial_scale_power": 40, "hysteresis": 1,
                                       "loss_scale_window": 1000, "min_loss_scale": 1}}))
    save = tmp_path / "ckpt"
    r = run_distributed(_overflow, 1, args=(str(save), str(ds)))[0]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    scales = [rec["loss_scale"] for rec in records]
    assert r["skipped"] >= 3
    assert records[-1]["skipped"] == r["skipped"]
    assert scales[0] > scales[-1] and scales[-1] < 2**40
    assert records[-1]["loss"] < records[0]["loss"]  # after the skipped steps it trains


def _metrics(rank, world, save, tb):
    import torch

    from mtnlg.training.loop import train

    train(_config("bf16", 4, save, logging={"tensorboard": tb}, train={"deterministic": True}))
    return torch.are_deterministic_algorithms_enabled()


def test_metrics_jsonl_and_tensorboard(tmp_path):
    """Also: train.deterministic switches torch's deterministic algorithms on (and the run works with them)."""
    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    assert run_distributed(_metrics, 1, args=(str(save), str(tb))) == [True]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 4]
    for key in ("iteration", "loss", "lr", "grad_norm", "loss_scale", "skipped", "tokens_per_s", "tflops", "mfu",
                "peak_mem_mb", "eta_s"):
        assert key in records[-1], key
    assert records[-1]["tokens_per_s"] > 0 and records[-1]["tflops"] > 0 and 0 < records[-1]["mfu"]
    assert records[-1]["grad_norm"] > 0 and records[-1]["peak_mem_mb"] > 10
    assert "val_loss" in records[-1]
    events = list(tb.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
