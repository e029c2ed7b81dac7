"""The DeepSpeed JSON gets the YAML's numbers filled in, and contradictions are refused."""

from __future__ import annotations

import json

import pytest

from mtnlg.config import from_dict, resolve
from mtnlg.errors import UserError
from mtnlg.training.ds_config import build_ds_config


def cfg(world=2, pp=1, precision="fp32", **train):
    raw = from_dict({"model": {"vocab_size": 1000, "architecture": "llama", "num_layers": 2},
                     "parallel": {"pipeline": pp},
                     "train": {"micro_batch_size": 2, "global_batch_size": 8, "precision": precision, **train}})
    return resolve(raw, world)


def test_fills_batch_precision_clip_and_optimizer():
    ds = build_ds_config(cfg(precision="bf16", lr=1e-3, clip_grad=0.5),
                         {"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}})
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (8, 2, 2)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"eps": 1e-6, "lr": 1e-3, "weight_decay": 0.1}


def test_agreeing_values_are_accepted():
    ds = build_ds_config(cfg(), {"train_batch_size": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0})
    assert ds["train_batch_size"] == 8


@pytest.mark.parametrize("user,run,message", [
    ({"train_batch_size": 16}, {}, "'train_batch_size' is 16 but the run config gives train.global_batch_size = 8"),
    ({"train_micro_batch_size_per_gpu": 4}, {}, "'train_micro_batch_size_per_gpu' is 4"),
    ({"gradient_clipping": 2.0}, {}, "'gradient_clipping' is 2.0 but the run config gives train.clip_grad = 1.0"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, {},
     "'bf16.enabled' is True but train.precision is fp32"),
    ({"fp16": {"enabled": False}, "zero_optimization": {"stage": 1}}, {"precision": "fp16"},
     "'fp16.enabled' is False but train.precision is fp16"),
    ({"zero_optimization": {"stage": 2}}, {"pp": 2}, "ZeRO stage 2 cannot be combined with pipeline parallelism"),
    ({"zero_optimization": {"stage": 3}}, {"pp": 2}, "ZeRO stage 3 cannot be combined with pipeline parallelism"),
    ({"zero_optimization": {"stage": 5}}, {}, "zero_optimization.stage = 5 must be 0, 1, 2 or 3"),
    ({}, {"precision": "fp16"}, "fp16 needs ZeRO stage >= 1"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, "remove 'scheduler'"),
    ({"optimizer": {"type": "Lamb"}}, {}, "optimizer type 'Lamb' is not supported; use AdamW or SGD"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, {}, "'lr' is 0.1 but the run config gives train.lr"),
])
def test_contradictions_are_refused(user, run, message):
    pp, tied = run.pop("pp", 1), run.pop("tied", False)
    c = cfg(world=2 * pp, pp=pp, **run)
    c.model.tie_embeddings = tied
    with pytest.raises(UserError) as err:
        build_ds_config(c, user)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.on_every_rank  # every rank reads the same JSON: rank 0 alone reports it


@pytest.mark.parametrize("pp,precision,tied", [(1, "fp32", False), (2, "fp32", True), (1, "bf16", False),
                                               (2, "bf16", True), (2, "fp16", False)])
def test_no_json_means_zero1_which_works_for_every_layout_and_precision(pp, precision, tied):
    c = cfg(world=2 * pp, pp=pp, precision=precision)
    c.model.tie_embeddings = tied
    ds = build_ds_config(c)  # no deepspeed_config
    assert ds["zero_optimization"]["stage"] == 1 and ds[precision if precision != "fp32" else "bf16"]["enabled"] \
        == (precision != "fp32")


def test_stage0_fp32_clipping_is_mtnlgs():
    """DeepSpeed's stage-0 fp32 clipping miscounts under pipeline parallelism; the guard clips there instead."""
    ds = build_ds_config(cfg(world=4, pp=2, clip_grad=0.5), {"zero_optimization": {"stage": 0}})
    assert ds["gradient_clipping"] == 0.0
    assert build_ds_config(cfg(clip_grad=0.5), {"zero_optimization": {"stage": 1}})["gradient_clipping"] == 0.5


def test_sgd_is_an_optimizer_choice():
    from mtnlg.training.ds_config import optimizer_kind, sgd_hyperparams

    ds = build_ds_config(cfg(lr=0.5, weight_decay=0.0), {"optimizer": {"type": "SGD", "params": {"momentum": 0.9}}})
    assert optimizer_kind(ds) == "sgd" and sgd_hyperparams(ds)["momentum"] == 0.9
    assert ds["optimizer"]["params"]["lr"] == 0.5
    assert optimizer_kind(build_ds_config(cfg())) == "adamw"


def test_malformed_json_names_the_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 1},\n  oops\n}')
    c = cfg()
    c.deepspeed_config = str(bad)
    with pytest.raises(UserError, match=r"ds.json:3: malformed JSON"):
        build_ds_config(c)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_configs_work_with_every_precision(stage):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "ds_configs" / f"zero{stage}.json"
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == stage
    for precision in ("fp32", "bf16", "fp16"):
        c = cfg(precision=precision)
        c.deepspeed_config = str(path)
        if stage == 0 and precision != "fp32":
            with pytest.raises(UserError):
                build_ds_config(c)
        else:
            assert build_ds_config(c)[precision if precision != "fp32" else "bf16"]["enabled"] == (precision != "fp32")
