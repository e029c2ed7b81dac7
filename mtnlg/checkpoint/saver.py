"""Saving a checkpoint on every rank (a collective), crash-safe and durable.

DeepSpeed writes its files (``engine.save_checkpoint``); every rank then fsyncs the files it wrote
(recorded as DeepSpeed writes them) and reports; only when every rank has, rank 0 writes the
``complete`` marker and ``latest`` (DeepSpeed would write ``latest`` before its final barrier). A
crash anywhere in between leaves the previous complete checkpoint the one that is resumed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import torch.distributed as dist

from mtnlg.checkpoint.tags import CONFIG_NAME, MARKER, TOKENIZER_DIR, complete_tags, tag_for
from mtnlg.config import RunConfig, save_config
from mtnlg.deepspeed_compat import record_writes
from mtnlg.errors import JobError
from mtnlg.files import fsync_path, write_atomic


def save(engine, cfg: RunConfig, iteration: int, client_state: dict, rank: int, tokenizer=None) -> Path:
    """Save on every rank (a collective); returns the tag directory.

    Each rank fsyncs what it wrote (its DeepSpeed files, the tag directory) and reports; only when every rank
    has, rank 0 writes the ``complete`` marker and ``latest``."""
    save_dir = Path(cfg.checkpoint.save)
    tag = tag_for(iteration)
    written = record_writes(engine)
    written.clear()
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    mine = [Path(p) for p in written]
    if rank == 0:
        save_config(cfg, save_dir / tag / CONFIG_NAME)
        mine.append(save_dir / tag / CONFIG_NAME)
        if tokenizer is not None and not (save_dir / TOKENIZER_DIR).is_dir():
            tokenizer.save(save_dir / TOKENIZER_DIR)
            mine += [f for f in (save_dir / TOKENIZER_DIR).iterdir() if f.is_file()]
    problem = None
    try:
        for f in mine:
            fsync_path(f)
        for d in {f.parent for f in mine} | {save_dir / tag}:
            fsync_path(d)
    except OSError as e:
        problem = f"{e.filename or save_dir / tag}: {e.strerror}"
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (socket.gethostname(), problem))  # every rank's shards are durable
    bad = [(r, host, why) for r, (host, why) in enumerate(reports) if why]
    if bad:
        r, host, why = bad[0]
        raise JobError(f"saving {save_dir / tag} failed on host {host} (rank {r}: {why}); it is left incomplete and "
                       "the previous checkpoint stays the one to resume from")
    _fault_point(iteration)
    if rank == 0:
        write_atomic(save_dir / tag / MARKER, f"{iteration}\n")
        write_atomic(save_dir / "latest", tag)
        if cfg.checkpoint.keep_last:
            for _, old in complete_tags(save_dir)[: -cfg.checkpoint.keep_last]:
                (save_dir / old / MARKER).unlink()  # incomplete first, then gone
                shutil.rmtree(save_dir / old, ignore_errors=True)
    dist.barrier()
    return save_dir / tag


FAULT_ENV = "MTNLG_FAULT_KILL_BEFORE_MARKER"


def _fault_point(iteration: int) -> None:
    """Fault injection for the crash-safety tests: with ``MTNLG_FAULT_KILL_BEFORE_MARKER=N`` the process kills
    itself (SIGKILL, as a lost node or an OOM killer would) at iteration N's save, after every rank's shards are
    written and fsynced and before the marker: the worst moment, reached deterministically. Unset: nothing."""
    at = os.environ.get(FAULT_ENV)
    if at and at.strip().lstrip("-").isdigit() and int(at) == iteration:
        os.kill(os.getpid(), signal.SIGKILL)
