"""Checkpoints in DeepSpeed's own layout, made crash-safe, with the run config beside them.

    <save>/global_step<N>/          DeepSpeed's files (model, optimizer, lr schedule, loss scaler)
    <save>/global_step<N>/mtnlg_config.yaml   the resolved run config of that run
    <save>/global_step<N>/complete  written last, atomically, once every rank has finished
    <save>/latest                   the tag of the newest complete checkpoint (DeepSpeed's format)
    <save>/tokenizer/               the tokenizer, when the run has one

A checkpoint counts only once ``complete`` exists, so a crash in the middle of a save leaves
the previous checkpoint the one that is resumed. DeepSpeed's own ``latest`` is written by
mtnlg after the marker (DeepSpeed would write it before its final barrier).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from mtnlg.config import RunConfig, save_config

MARKER = "complete"
CONFIG_NAME = "mtnlg_config.yaml"
TOKENIZER_DIR = "tokenizer"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary name, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_tags(directory: str | Path) -> list[tuple[int, str]]:
    """(iteration, tag) of every complete checkpoint in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = TAG_RE.match(child.name)
        if m and (child / MARKER).is_file():
            found.append((int(m.group(1)), child.name))
    return sorted(found)


def latest_tag(directory: str | Path) -> str | None:
    tags = complete_tags(directory)
    return tags[-1][1] if tags else None


def save(engine, cfg: RunConfig, iteration: int, client_state: dict, rank: int, tokenizer=None) -> Path:
    """Save on every rank (a collective); returns the tag directory."""
    save_dir = Path(cfg.checkpoint.save)
    tag = tag_for(iteration)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    if rank == 0:
        save_config(cfg, save_dir / tag / CONFIG_NAME)
        if tokenizer is not None and not (save_dir / TOKENIZER_DIR).is_dir():
            tokenizer.save(save_dir / TOKENIZER_DIR)
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        write_atomic(save_dir / tag / MARKER, f"{iteration}\n")
        write_atomic(save_dir / "latest", tag)
        if cfg.checkpoint.keep_last:
            for _, old in complete_tags(save_dir)[: -cfg.checkpoint.keep_last]:
                (save_dir / old / MARKER).unlink()  # incomplete first, then gone
                shutil.rmtree(save_dir / old, ignore_errors=True)
    dist.barrier()
    return save_dir / tag
