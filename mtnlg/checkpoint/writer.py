"""Write a weights-only mtnlg checkpoint for a (tp, pp) layout, in DeepSpeed's file layout.

    <dir>/global_step0/mp_rank_TT_model_states.pt          pp = 1: {"module": tp rank TT's state dict, ...}
    <dir>/global_step0/layer_LL-model_TT-model_states.pt   pp > 1: layer LL's state dict on tp rank TT
    <dir>/global_step0/mp_rank_MM_model_states.pt          pp > 1: metadata (module=None), MM = pp-major rank
    <dir>/global_step0/mtnlg_config.yaml, weights_only, complete
    <dir>/latest

These are the names DeepSpeed's engines write (and its ``load_checkpoint(load_module_only=True)``
reads) for that layout; there are no optimizer files. ``mtnlg train`` with ``checkpoint.load``
on it starts at iteration 0 with a fresh optimizer (``resume.load_weights``), under any layout
and ZeRO stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from mtnlg.checkpoint import ds_files
from mtnlg.checkpoint.reader import shard_for
from mtnlg.checkpoint.tags import CONFIG_NAME, MARKER, WEIGHTS_ONLY, tag_for
from mtnlg.checkpoint.universal import universal_checkpoint_info
from mtnlg.config import ModelConfig, RunConfig, save_config
from mtnlg.model.layout import Group, groups


def _metadata(model_cfg: ModelConfig, tp: int, pp: int) -> dict:
    """The non-weight entries DeepSpeed puts in a model-states file (for an untrained engine)."""
    import deepspeed

    return {**ds_files.untrained_model_states(tp, pp, deepspeed.__version__),
            "universal_checkpoint_info": universal_checkpoint_info(model_cfg, tp), "iteration": 0,
            "consumed_samples": 0}


def write_weights_only(root: Path, run_cfg: RunConfig, model_cfg: ModelConfig,
                       read_group: Callable[[Group], dict[str, torch.Tensor]], source: str) -> Path:
    """Write the checkpoint of iteration 0 under ``root``; ``read_group`` gives full unpadded tensors.

    Memory: pp > 1 holds one layer at a time; pp = 1 holds one tp rank's file (the model / tp).
    """
    tp, pp = run_cfg.parallel.tensor, run_cfg.parallel.pipeline
    tag_dir = root / tag_for(0)
    tag_dir.mkdir(parents=True)
    meta = _metadata(model_cfg, tp, pp)
    if pp > 1:
        for group in groups(model_cfg):
            tensors = read_group(group)
            for t in range(tp):
                sd = {local: shard_for(local, x, model_cfg, t, tp) for local, x in tensors.items()}
                torch.save(sd, tag_dir / ds_files.layer_states(group.spec_index, t))
        for mp in range(tp * pp):
            torch.save({ds_files.MODULE: None, **meta}, tag_dir / ds_files.model_states(mp))
    else:
        for t in range(tp):
            module = {}
            for group in groups(model_cfg):
                for local, x in read_group(group).items():
                    module[group.full(local)] = shard_for(local, x, model_cfg, t, tp)
            torch.save({ds_files.MODULE: module, **meta}, tag_dir / ds_files.model_states(t))
            del module
    save_config(run_cfg, tag_dir / CONFIG_NAME)
    (tag_dir / WEIGHTS_ONLY).write_text(json.dumps({"source": source, "tensor": tp, "pipeline": pp}) + "\n")
    (tag_dir / MARKER).write_text("0\n")
    (root / "latest").write_text(tag_for(0))
    return tag_dir
