"""Where checkpoints live and when one counts: tags, markers and the files beside DeepSpeed's own.

    <save>/global_step<N>/          DeepSpeed's files (model, optimizer, lr schedule, loss scaler)
    <save>/global_step<N>/mtnlg_config.yaml   the resolved run config of that run
    <save>/global_step<N>/complete  written last, atomically, once every rank's files are durable
    <save>/latest                   the tag of the newest complete checkpoint (DeepSpeed's format)
    <save>/tokenizer/               the tokenizer, when the run has one

A checkpoint counts only once ``complete`` exists. ``weights_only`` marks an ``mtnlg import-hf``
output (module weights, no optimizer) and ``universal`` a ``mtnlg checkpoint reshard`` output.
"""

from __future__ import annotations

import re
from pathlib import Path

from mtnlg.errors import UserError

MARKER = "complete"
CONFIG_NAME = "mtnlg_config.yaml"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_ONLY = "weights_only"
UNIVERSAL_MARKER = "universal"
TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


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


def is_weights_only(tag_dir: str | Path) -> bool:
    """True for a checkpoint holding module weights only (written by ``mtnlg import-hf``)."""
    return (Path(tag_dir) / WEIGHTS_ONLY).is_file()


def is_universal(tag_dir: str | Path) -> bool:
    """True for DeepSpeed's universal format (written by ``mtnlg checkpoint reshard``)."""
    return (Path(tag_dir) / UNIVERSAL_MARKER).is_file()


def find_tag(path: str | Path, iteration: int | None = None) -> tuple[Path, Path, int]:
    """(root, tag directory, iteration) of a complete checkpoint under ``path`` (or ``path`` itself): the newest,
    or that of ``iteration``. A missing or incomplete one is a one-line ``UserError``."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint directory {p} not found; pass the checkpoint.save directory of a run")
    m = TAG_RE.match(p.name)
    if m and (p / CONFIG_NAME).is_file():  # a global_stepN directory itself
        if iteration is not None and iteration != int(m.group(1)):
            raise UserError(f"{p} is the checkpoint of iteration {m.group(1)}, not {iteration}; drop --iteration")
        if not (p / MARKER).is_file():
            raise UserError(f"{p} is incomplete (no '{MARKER}' marker: the run stopped while saving it)")
        return p.parent, p, int(m.group(1))
    tags = complete_tags(p)
    if not tags:
        raise UserError(
            f"{p} is not an mtnlg checkpoint (no complete global_step*/ inside); pass the checkpoint.save "
            "directory of a training run or the output of `mtnlg import-hf`"
        )
    if iteration is None:
        it, tag = tags[-1]
        return p, p / tag, it
    found = dict(tags)
    if iteration not in found:
        have = ", ".join(str(i) for i, _ in tags)
        if (p / tag_for(iteration)).is_dir():
            raise UserError(f"{p / tag_for(iteration)} is incomplete (no '{MARKER}' marker); "
                            f"complete iterations: {have}")
        raise UserError(f"{p} has no checkpoint of iteration {iteration}; complete iterations: {have}")
    return p, p / found[iteration], iteration
