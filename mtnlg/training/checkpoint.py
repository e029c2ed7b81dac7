"""Checkpoints in DeepSpeed's own layout, made crash-safe, with the run config beside them.

    <save>/global_step<N>/          DeepSpeed's files (model, optimizer, lr schedule, loss scaler)
    <save>/global_step<N>/mtnlg_config.yaml   the resolved run config of that run
    <save>/global_step<N>/complete  written last, atomically, once every rank has finished
    <save>/latest                   the tag of the newest complete checkpoint (DeepSpeed's format)
    <save>/tokenizer/               the tokenizer, when the run has one

A checkpoint counts only once ``complete`` exists, so a crash in the middle of a save leaves
the previous checkpoint the one that is resumed. Every rank fsyncs the files it wrote and reports
them durable before rank 0 writes the marker; DeepSpeed's own ``latest`` is written by mtnlg after
the marker (DeepSpeed would write it before its final barrier).

Nodes need not share a filesystem: on resume rank 0 alone picks the checkpoint (from its disk) and
tells the others, and every rank checks that the files it will load are there and whole
(``check_readable``), so a node that lacks them stops the job with its name instead of silently
starting from iteration 0.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import zipfile
from pathlib import Path

import torch.distributed as dist

from mtnlg.config import RunConfig, save_config
from mtnlg.errors import JobError

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_writes(engine) -> list[str]:
    """The paths DeepSpeed's checkpoint engine writes on this rank, recorded as it writes them (the list is
    cleared by ``save`` before each checkpoint). DeepSpeed 0.19.8 writes every checkpoint file (model states,
    pipeline layer files, ZeRO optimizer partitions) through ``engine.checkpoint_engine.save(state, path)``;
    pinned by tests/test_checkpoints.py."""
    ce = engine.checkpoint_engine
    if not hasattr(ce, "_mtnlg_written"):
        original = ce.save
        ce._mtnlg_written = []

        def save(state_dict, path, *args, **kwargs):
            out = original(state_dict, path, *args, **kwargs)
            ce._mtnlg_written.append(str(path))
            return out

        ce.save = save
    return ce._mtnlg_written


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
            _fsync(f)
        for d in {f.parent for f in mine} | {save_dir / tag}:
            _fsync(d)
    except OSError as e:
        problem = f"{e.filename or save_dir / tag}: {e.strerror}"
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (socket.gethostname(), problem))  # every rank's shards are durable
    bad = [(r, host, why) for r, (host, why) in enumerate(reports) if why]
    if bad:
        r, host, why = bad[0]
        raise JobError(f"saving {save_dir / tag} failed on host {host} (rank {r}: {why}); it is left incomplete and "
                       "the previous checkpoint stays the one to resume from")
    if rank == 0:
        write_atomic(save_dir / tag / MARKER, f"{iteration}\n")
        write_atomic(save_dir / "latest", tag)
        if cfg.checkpoint.keep_last:
            for _, old in complete_tags(save_dir)[: -cfg.checkpoint.keep_last]:
                (save_dir / old / MARKER).unlink()  # incomplete first, then gone
                shutil.rmtree(save_dir / old, ignore_errors=True)
    dist.barrier()
    return save_dir / tag


# --------------------------------------------------------------------------- resuming without a shared disk


def listing(tag_dir: Path) -> dict[str, int]:
    """Every file under a checkpoint's tag directory (relative path -> size in bytes)."""
    return {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*")) if f.is_file()}


def native_files(seen: dict[str, int], tp_rank: int, pp_rank: int, dp_rank: int, tp: int, pp: int,
                 layer_files: list[int]) -> list[str]:
    """The files of a native checkpoint DeepSpeed (0.19.8) opens on the rank at (tp_rank, pp_rank, dp_rank) of a
    tp x pp layout: the model states of every model-parallel rank (``mp_rank_MM_model_states.pt``, or ZeRO-3's
    ``zero_pp_rank_D_mp_rank_MM_model_states.pt`` of its own D: its loader counts them against the saved
    model-parallel size), its own ZeRO optimizer partition (``[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt``)
    and, under pipeline parallelism, the files of its stage's layers (``layer_LL-model_TT-model_states.pt`` for LL in
    ``layer_files``). ``seen``: the files rank 0 sees, which tell the ZeRO-3 and optimizer-file naming in use."""
    mp = pp_rank * tp + tp_rank
    zero3 = any(re.fullmatch(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt", n) for n in seen)
    states = "zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt" if zero3 else "mp_rank_{m:02d}_model_states.pt"
    wanted = [states.format(d=dp_rank, m=m) for m in range(tp * pp)]
    optim = [n for n in seen if n.endswith("optim_states.pt")]
    if optim:
        prefix = "bf16_" if optim[0].startswith("bf16_") else ""
        wanted.append(f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt")
    if pp > 1:
        wanted += [f"layer_{i:02d}-model_{tp_rank:02d}-model_states.pt" for i in layer_files]
    return wanted


def unreadable(tag_dir: Path, names: list[str], sizes: dict[str, int]) -> list[str]:
    """What is wrong with the files ``names`` of ``tag_dir`` on this host ('missing X', 'X is truncated'), comparing
    with ``sizes`` (as rank 0 sees them) and, for torch's zip format, opening the archive's directory (a file cut
    short has none)."""
    problems = []
    for name in names:
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"missing {name}")
            continue
        size = path.stat().st_size
        if size != sizes.get(name, size):
            problems.append(f"{name} has {size} bytes, not {sizes[name]}")
            continue
        if name.endswith(".pt"):
            with open(path, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"
            if is_zip:
                try:
                    zipfile.ZipFile(path).close()
                except (zipfile.BadZipFile, OSError):
                    problems.append(f"{name} is truncated or corrupt")
    return problems


def agree_readable(tag_dir: Path, names: list[str], sizes: dict[str, int], what: str) -> None:
    """Every rank checks its own ``names`` (a collective); if any rank lacks one or finds one damaged, every rank
    raises the same one-line error naming the hosts and files."""
    problems = unreadable(tag_dir, names, sizes)
    reports = [(socket.gethostname(), problems)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (socket.gethostname(), problems))
    by_host: dict[str, tuple[list[int], list[str]]] = {}
    for r, (host, found) in enumerate(reports):
        if found:
            ranks, items = by_host.setdefault(host, ([], []))
            ranks.append(r)
            items.extend(x for x in found if x not in items)
    if not by_host:
        return
    parts = []
    for host, (ranks, items) in by_host.items():
        shown = ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
        parts.append(f"host {host} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}): {shown}")
    damaged = any("truncated" in x or "bytes, not" in x for _, items in by_host.values() for x in items)
    fix = (f"the checkpoint was not written completely; remove {tag_dir} to resume from the one before it"
           if damaged else "every node must see the files its ranks load: put checkpoint.load on a shared "
           "filesystem or copy the checkpoint to every node")
    raise JobError(f"{what} {tag_dir} cannot be loaded: {'; '.join(parts)}; {fix}")
