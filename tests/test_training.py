"""3D training through DeepSpeed's engines: layouts and ZeRO stages agree, resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_helper import run_distributed

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
RTOL = 1e-4

MODEL = {
    "gpt2": {"preset": "gpt2", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
             "vocab_size": 96, "seq_length": 32},
    "llama": {"preset": "llama", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
              "num_kv_heads": 2, "vocab_size": 96, "seq_length": 32},
}


def run_config(preset: str, tp: int = 1, pp: int = 1, zero: int = 1, precision: str = "fp32",
               iters: int = STEPS, save: str | None = None, load: str | None = None, model: dict | None = None,
               **train):
    from mtnlg.config import from_dict

    return from_dict({
        "model": {**MODEL[preset], **(model or {})},
        "parallel": {"tensor": tp, "pipeline": pp},
        "train": {"iters": iters, "micro_batch_size": 2, "global_batch_size": 8, "lr": 2e-3, "min_lr": 2e-4,
                  "warmup_iters": 2, "log_interval": 1, "precision": precision, "seed": 7,
                  "peak_tflops": 1.0, **train},
        "data": {"synthetic": {"branching": 4, "seed": 3}},
        "checkpoint": {"save": save, "load": load, "interval": 0},
        "deepspeed_config": str(ROOT / "ds_configs" / f"zero{zero}.json"),
    })


def _train_many(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """Train each run config in turn on this process group; return each run's losses."""
    from mtnlg.training.loop import train

    out = []
    for kwargs in runs:
        summary = train(run_config(**kwargs))
        out.append({"losses": summary.losses, "skipped": summary.skipped, "record": summary.last_record})
    return out


def _losses(runs: list[dict], world: int) -> list[dict[int, float]]:
    results = run_distributed(_train_many, world, args=(runs,))
    # every rank reports the same (dp-averaged, pipeline-broadcast) losses
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert a["losses"] == b["losses"]
    return [r["losses"] for r in results[0]]


def _max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b) and len(a) == STEPS
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2), (1, 1)], 4: [(2, 2)], 8: [(2, 2)]}  # world -> (tp, pp)


@pytest.fixture(scope="module")
def layout_losses():
    """Losses of every (preset, tp, pp, dp) and of ZeRO 0-3 at pp=1."""
    out = {}
    for world, layouts in LAYOUTS.items():
        runs = [{"preset": p, "tp": tp, "pp": pp} for p in MODEL for tp, pp in layouts]
        keys = [(p, tp, pp, world // (tp * pp), 1) for p in MODEL for tp, pp in layouts]
        if world == 2:  # ZeRO stages at pp=1 with dp=2 (and tp=2 for stage 3); activation checkpointing
            runs += [{"preset": "llama", "zero": z} for z in (0, 2, 3)] + [{"preset": "gpt2", "tp": 2, "zero": 3}]
            keys += [("llama", 1, 1, 2, z) for z in (0, 2, 3)] + [("gpt2", 2, 1, 1, 3)]
            ckpt = {"activation_checkpointing": True}
            runs += [{"preset": p, "tp": tp, "pp": pp, "model": ckpt} for p in MODEL for tp, pp in [(1, 2), (2, 1)]]
            keys += [(p, tp, pp, 1, "ckpt") for p in MODEL for tp, pp in [(1, 2), (2, 1)]]
        out.update(zip(keys, _losses(runs, world)))
    return out


@pytest.mark.parametrize("preset", list(MODEL))
@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 2, 2)])
def test_layout_parity(layout_losses, preset, tp, pp, dp):
    base = layout_losses[(preset, 1, 1, 1, 1)]
    got = layout_losses[(preset, tp, pp, dp, 1)]
    assert _max_rel(got, base) < RTOL, (got, base)
    assert base[STEPS] < base[1] - 0.05  # it is learning


@pytest.mark.parametrize("preset", list(MODEL))
@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1)])
def test_activation_checkpointing_matches(layout_losses, preset, tp, pp):
    """Full recompute (DeepSpeed's pipeline with mtnlg's RNG-replaying checkpoint, or GPTModel's) changes nothing."""
    assert _max_rel(layout_losses[(preset, tp, pp, 1, "ckpt")], layout_losses[(preset, 1, 1, 1, 1)]) < RTOL


@pytest.mark.parametrize("zero,tp", [(2, 1), (3, 1), (3, 2)])
def test_zero_stages_match_stage0(layout_losses, zero, tp):
    preset = "llama" if tp == 1 else "gpt2"
    ref = layout_losses[(preset, 1, 1, 2, 0)] if tp == 1 else layout_losses[(preset, 1, 1, 1, 1)]
    stage1 = layout_losses[(preset, 1, 1, 2, 1)] if tp == 1 else ref
    got = layout_losses[(preset, tp, 1, 2 // tp, zero)]
    assert _max_rel(stage1, ref) < RTOL
    assert _max_rel(got, ref) < RTOL


def _resume(rank: int, world: int, save: str, tp: int, pp: int, zero: int, precision: str) -> dict:
    from mtnlg.training.loop import train

    common = {"preset": "gpt2", "tp": tp, "pp": pp, "zero": zero, "precision": precision,
              "model": {"hidden_dropout": 0.1, "attention_dropout": 0.1}}  # the RNG must resume too
    full = train(run_config(iters=2 * STEPS, **common))
    first = train(run_config(iters=STEPS, save=save, lr_decay_iters=2 * STEPS, **common))
    second = train(run_config(iters=2 * STEPS, save=save, load=save, **common))
    return {"full": full.losses, "first": first.losses, "second": second.losses}


@pytest.mark.parametrize("world,tp,pp,zero,precision", [(1, 1, 1, 1, "fp32"), (4, 2, 2, 1, "fp32"),
                                                        (2, 1, 1, 3, "fp32"), (2, 1, 1, 2, "fp16")])
def test_resume_is_exact(tmp_path, world, tp, pp, zero, precision):
    res = run_distributed(_resume, world, args=(str(tmp_path / "ckpt"), tp, pp, zero, precision))[0]
    resumed = {**res["first"], **res["second"]}
    assert sorted(res["second"]) == list(range(STEPS + 1, 2 * STEPS + 1))
    assert resumed == res["full"]  # bit-exact, every step
