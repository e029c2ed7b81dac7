"""Change the layout of a checkpoint: ``mtnlg checkpoint reshard --checkpoint DIR --output DIR2``.

DeepSpeed's ``ds_to_universal`` merges every parameter and its optimizer state (fp32 master,
Adam moments, step) across the dp, tp and pp shards, following the universal-checkpoint
rules mtnlg registers with every checkpoint (training/universal.py). The result resumes
under any (tp, pp, dp) and ZeRO stage >= 1: training with ``checkpoint.load=DIR2`` loads it
through DeepSpeed's ``load_universal`` and re-splits it for the new layout.

    DIR2/global_stepN/     DeepSpeed's universal files (zero/<param>/fp32.pt, ...)
                           + mtnlg_config.yaml (the source run) + ``universal`` + ``complete``
    DIR2/latest, DIR2/latest_universal, DIR2/tokenizer/
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mtnlg.errors import UserError
from mtnlg.training import checkpoint as ckpt

UNIVERSAL_MARKER = "universal"


def find_tag(directory: str | Path, iteration: int | None = None) -> str:
    """The tag of a complete checkpoint in ``directory`` (the newest, or ``global_step<iteration>``)."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"checkpoint directory {d} not found")
    tags = dict(ckpt.complete_tags(d))
    if not tags:
        raise UserError(f"{d} holds no complete mtnlg checkpoint (no global_step*/complete); check the path")
    if iteration is None:
        return tags[max(tags)]
    if iteration not in tags:
        raise UserError(f"{d} has no complete checkpoint for iteration {iteration}; it has {sorted(tags)}")
    return tags[iteration]


def is_universal(tag_dir: Path) -> bool:
    return (tag_dir / UNIVERSAL_MARKER).is_file()


def _both_model_state_names(tag_dir: Path) -> None:
    """DeepSpeed looks for ``mp_rank_XX_model_states.pt`` when loading into ZeRO 1/2 and for
    ``zero_pp_rank_0_mp_rank_XX_model_states.pt`` into ZeRO-3; with a universal checkpoint both
    carry the same metadata (weights come from ``zero/``), so provide both names (hard links)."""
    for f in list(tag_dir.glob("mp_rank_*_model_states.pt")):
        other = tag_dir / f"zero_pp_rank_0_{f.name}"
        if not other.exists():
            os.link(f, other)
    for f in list(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt")):
        other = tag_dir / f.name.removeprefix("zero_pp_rank_0_")
        if not other.exists():
            os.link(f, other)


def _stage3_optimizer_state(zero_dir: Path) -> None:
    """A ZeRO-1/2 source writes its global optimizer state flat; DeepSpeed's ZeRO-3 universal loader
    reads ``optimizer_state_dict`` (the step and the param groups). Add that view, so a ZeRO-1/2
    checkpoint also resumes under ZeRO-3."""
    import torch

    path = zero_dir / "optimizer_state.pt"
    sd = torch.load(path, weights_only=False)
    if "optimizer_state_dict" in sd:
        return
    step_file = next(zero_dir.glob("*/step.pt"), None)
    step = torch.load(step_file, weights_only=False) if step_file is not None else 0
    sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)


def reshard(checkpoint_dir: str | Path, output_dir: str | Path, iteration: int | None = None,
            workers: int = 1, log: Callable[[str], None] = print) -> Path:
    """Write a universal (layout-free) copy of a checkpoint; returns the output directory."""
    from mtnlg.config import load_config
    from mtnlg.training.ds_config import load_ds_json, zero_stage

    src, out = Path(checkpoint_dir), Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty; choose a new one")
    tag = find_tag(src, iteration)
    if is_universal(src / tag):
        raise UserError(f"{src / tag} is already a universal checkpoint; train from it directly")
    saved = load_config(src / tag / ckpt.CONFIG_NAME)
    stage = zero_stage(load_ds_json(saved.deepspeed_config)) if saved.deepspeed_config else 0
    if not list((src / tag).glob("*optim_states.pt")) or stage == 0:
        raise UserError(f"{src / tag} was trained with ZeRO stage 0, which keeps no optimizer shards to reshard; "
                        "train with ZeRO stage >= 1 (ds_configs/zero1.json), or export the weights with export-hf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log(f"converting {src / tag} to a universal checkpoint ({workers} workers)")
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src / tag),
               "--output_folder", str(tmp / tag), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        if proc.returncode != 0:
            last = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:]
            raise UserError(f"DeepSpeed's ds_to_universal failed on {src / tag}: {last[0] if last else '?'}")
        _both_model_state_names(tmp / tag)
        _stage3_optimizer_state(tmp / tag / "zero")
        shutil.copy2(src / tag / ckpt.CONFIG_NAME, tmp / tag / ckpt.CONFIG_NAME)
        if (src / ckpt.TOKENIZER_DIR).is_dir():
            shutil.copytree(src / ckpt.TOKENIZER_DIR, tmp / ckpt.TOKENIZER_DIR)
        ckpt.write_atomic(tmp / tag / UNIVERSAL_MARKER, "deepspeed universal checkpoint\n")
        ckpt.write_atomic(tmp / tag / ckpt.MARKER, tag.removeprefix("global_step") + "\n")
        ckpt.write_atomic(tmp / "latest", tag)
        ckpt.write_atomic(tmp / "latest_universal", tag)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out / tag}: resume it under any layout with --set checkpoint.load={out}")
    return out
