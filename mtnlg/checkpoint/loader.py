"""The one weight loader: build an empty module of any model family for a layout, and fill it from a checkpoint
of any layout. Export and evaluation (``load_native_model``, ``mtnlg.eval.native``), distillation's teacher and
weights-only fine-tuning (``mtnlg.checkpoint.resume.load_weights``, into a DeepSpeed engine) all read through it.

    ckpt = open_checkpoint("runs/tiny")
    module = load_model(ckpt, cfg, ps, device="cpu", dtype=torch.bfloat16)   # this rank's tp shard (of its stage)

Each parameter of the module is found by its full name in the checkpoint's groups (``mtnlg.model.layout``), the
group merged to full size (whatever tp, pp, dp and ZeRO stage wrote it) and cut to this rank's tensor-parallel
shard (``shard_for``). A parameter the checkpoint does not cover is a bug (the groups are read off the model).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mtnlg.checkpoint.reader import NativeCheckpoint, shard_for
from mtnlg.config import ModelConfig
from mtnlg.model.layout import Group
from mtnlg.model.registry import family
from mtnlg.parallel import ParallelState


def empty_model(cfg: ModelConfig, ps: ParallelState | None = None, specs: range | None = None) -> torch.nn.Module:
    """The family's pipeline-free module for ``ps`` (or one pipeline stage: ``specs``), on the meta device: no
    memory, no random initialisation (every parameter is about to be loaded)."""
    with torch.device("meta"):
        return family(cfg).model(cfg, ps or ParallelState.single(), specs=specs)


def shard_values(ckpt: NativeCheckpoint, cfg: ModelConfig, params: dict[str, torch.nn.Parameter], tp_rank: int,
                 tp: int, source: str = "auto"
                 ) -> Iterator[tuple[Group, dict[str, torch.nn.Parameter], dict[str, torch.Tensor]]]:
    """Per checkpoint group that holds some of ``params`` (full name -> parameter): (the group, {local name:
    parameter}, {local name: this rank's shard of the checkpoint's value}). Groups no parameter of ``params`` is in
    are not read (another pipeline stage holds them)."""
    for group in ckpt.groups:
        wanted = {local: params[group.full(local)] for local in group.locals if group.full(local) in params}
        if not wanted:
            continue
        tensors = ckpt.read_group(group, source)
        yield group, wanted, {local: shard_for(local, tensors[local], cfg, tp_rank, tp) for local in wanted}


def load_into(module: torch.nn.Module, ckpt: NativeCheckpoint, cfg: ModelConfig, tp_rank: int = 0, tp: int = 1,
              source: str = "auto") -> None:
    """Copy a checkpoint's weights into every parameter of ``module`` (this rank's tp shards)."""
    params = dict(module.named_parameters())
    left = set(params)
    with torch.no_grad():
        for group, wanted, values in shard_values(ckpt, cfg, params, tp_rank, tp, source):
            for local, p in wanted.items():
                p.copy_(values[local])
                left.discard(group.full(local))
    if left:  # a bug, not a user error: the groups are read off the model
        raise RuntimeError(f"parameters not loaded from the checkpoint: {sorted(left)}")


def load_model(ckpt: NativeCheckpoint, cfg: ModelConfig, ps: ParallelState | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, specs: range | None = None,
               source: str = "auto") -> torch.nn.Module:
    """An eval-mode module of ``cfg`` (resolved for ``ps``'s tensor size) for ``ps`` (default: one process) holding
    the checkpoint's weights, in ``dtype`` on ``device``."""
    ps = ps or ParallelState.single()
    module = empty_model(cfg, ps, specs)
    module.to_empty(device=device)
    load_into(module, ckpt, cfg, ps.tp_rank, ps.tp_size, source)
    return module.to(dtype).eval()
