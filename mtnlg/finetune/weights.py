"""A pretrained checkpoint's encoder into a fine-tuning model: every parameter both models have (same full name,
same sharding kind and full shape) is loaded, whatever layout wrote it; the rest (the task head's new layers) keeps
its fresh initialisation. The pretraining heads (MLM transform, vocabulary bias, sentence-order head) have no
counterpart in a task model and are not read.

Megatron-LM's ``tasks/`` do the same (the pretrained checkpoint loaded non-strictly into the classification model):
the pooler is kept from pretraining when the checkpoint has one, as in Hugging Face's ``...ForSequenceClassification``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mtnlg.checkpoint.reader import NativeCheckpoint, check_same_model
from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.model.layout import groups
from mtnlg.model.registry import family


def is_task_model(cfg: ModelConfig) -> bool:
    """Whether a model config's family has task heads (``model.head``: the BERT family)."""
    return hasattr(cfg.family_knobs, "head") and not family(cfg).causal_lm


def check_pretrained(ckpt: NativeCheckpoint, want: ModelConfig, where: str) -> None:
    """One line when the checkpoint is not an encoder of the run config's shape (another family, other sizes)."""
    have = ckpt.model_cfg
    if not is_task_model(have):
        raise UserError(f"{where} holds a {have.architecture} model ({family(have).name} family); the BERT tasks "
                        "fine-tune a BERT encoder (model.architecture megatron_bert or bert): give a BERT checkpoint")
    k = have.family_knobs
    same_head = dataclasses.replace(want.family_knobs, head=k.head, num_classes=k.num_classes,
                                    binary_head=k.binary_head)
    check_same_model(have, dataclasses.replace(want, family_knobs=same_head), where)


def _shapes(cfg: ModelConfig) -> dict[str, tuple]:
    return {g.full(local): (s.kind, tuple(s.full_shape)) for g in groups(cfg) for local, s in g.params}


def shared_names(have: ModelConfig, want: ModelConfig) -> tuple[set[str], list[str]]:
    """(parameters of ``want`` the checkpoint's model ``have`` holds alike, parameters of ``want`` it lacks)."""
    mine, theirs = _shapes(want), _shapes(have)
    shared = {n for n, s in mine.items() if theirs.get(n) == s}
    return shared, sorted(set(mine) - shared)


def load_pretrained(engine, ckpt: NativeCheckpoint) -> tuple[int, list[str]]:
    """Load the checkpoint's shared parameters into a freshly built training ``Engine`` (any layout, ZeRO 0-3; the
    fp32 master weights too); returns (parameters loaded on this rank, names initialised fresh)."""
    from mtnlg.checkpoint.loader import shard_values
    from mtnlg.deepspeed_compat import gathered_for_write, set_fp32_master, set_zero3_fp32_masters

    cfg, ps = engine.cfg.model, engine.ps
    shared, fresh = shared_names(ckpt.model_cfg, cfg)
    params = {n: p for n, p in engine.engine.module.named_parameters() if n in shared}
    loaded = 0
    with torch.no_grad():
        for _, wanted, values in shard_values(ckpt, cfg, params, ps.tp_rank, ps.tp_size):
            if engine.zero_stage == 3:
                with gathered_for_write(list(wanted.values())):
                    for local, p in wanted.items():
                        p.data.copy_(values[local])
            else:
                for local, p in wanted.items():
                    p.data.copy_(values[local])
                    set_fp32_master(p, values[local])
            loaded += len(wanted)
        if engine.zero_stage == 3:
            def reread():  # a second read, for the masters of mixed precision
                for _, wanted, values in shard_values(ckpt, cfg, params, ps.tp_rank, ps.tp_size):
                    yield from ((p, values[local]) for local, p in wanted.items())
            set_zero3_fp32_masters(engine.engine.optimizer, reread, ps.dp_size, engine.cfg.train.precision != "fp32")
    return loaded, fresh


def open_pretrained(path: str | Path) -> NativeCheckpoint:
    """The newest complete checkpoint under ``path`` (a training run's checkpoint.save, or an import-hf output)."""
    from mtnlg.checkpoint.reader import open_checkpoint

    if not Path(path).is_dir():
        raise UserError(f"--pretrained {path} is not a directory; give a checkpoint.save directory of a run or an "
                        "`mtnlg import-hf` output")
    return open_checkpoint(path)
