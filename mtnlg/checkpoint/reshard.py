"""Change the layout of a checkpoint: ``mtnlg checkpoint reshard --checkpoint DIR --output DIR2``.

DeepSpeed's ``ds_to_universal`` merges every parameter and its optimizer state (fp32 master,
Adam moments, step) across the dp, tp and pp shards, following the universal-checkpoint
rules mtnlg registers with every checkpoint (``checkpoint/universal.py``). The result resumes
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
from collections.abc import Callable
from pathlib import Path

from mtnlg.checkpoint import ds_files
from mtnlg.checkpoint.reader import NativeCheckpoint
from mtnlg.checkpoint.tags import CONFIG_NAME, MARKER, TOKENIZER_DIR, UNIVERSAL_MARKER, find_tag, is_universal
from mtnlg.deepspeed_compat import universal_model_state_names, universal_stage3_optimizer_state
from mtnlg.errors import UserError
from mtnlg.files import atomic_dir, write_atomic


def reshard(checkpoint_dir: str | Path, output_dir: str | Path, iteration: int | None = None,
            workers: int = 1, log: Callable[[str], None] = print) -> Path:
    """Write a universal (layout-free) copy of a checkpoint; returns the output directory."""
    src, out = Path(checkpoint_dir), Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} exists and is not empty; choose a new one")
    root, tag_dir, it = find_tag(src, iteration)
    tag = tag_dir.name
    if is_universal(tag_dir):
        raise UserError(f"{tag_dir} is already a universal checkpoint; train from it directly")
    if not list(tag_dir.glob(ds_files.optim_glob())) or NativeCheckpoint(root, tag_dir, it).layout.zero_stage == 0:
        raise UserError(f"{tag_dir} was trained with ZeRO stage 0, which keeps no optimizer shards to reshard; "
                        "train with ZeRO stage >= 1 (ds_configs/zero1.json), or export the weights with export-hf")
    with atomic_dir(out) as tmp:
        log(f"converting {tag_dir} to a universal checkpoint ({workers} workers)")
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp / tag), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        if proc.returncode != 0:
            last = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:]
            raise UserError(f"DeepSpeed's ds_to_universal failed on {tag_dir}: {last[0] if last else '?'}")
        universal_model_state_names(tmp / tag)
        universal_stage3_optimizer_state(tmp / tag / "zero")
        shutil.copy2(tag_dir / CONFIG_NAME, tmp / tag / CONFIG_NAME)
        if (root / TOKENIZER_DIR).is_dir():
            shutil.copytree(root / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        write_atomic(tmp / tag / UNIVERSAL_MARKER, "deepspeed universal checkpoint\n")
        write_atomic(tmp / tag / MARKER, f"{it}\n")
        write_atomic(tmp / "latest", tag)
        write_atomic(tmp / "latest_universal", tag)
    log(f"wrote {out / tag}: resume it under any layout with --set checkpoint.load={out}")
    return out
