"""Inference on a native checkpoint in a tensor/pipeline layout, for evaluation under the launchers.

Every rank builds its own part of the model (the family's pipeline-free model for pp = 1, or its pipeline stage of
the ``PipelineModule``) on the meta device and copies in its tensor-parallel shard of each
parameter, read from the checkpoint (any layout it was saved in). A forward pass sends the
hidden states stage to stage (point-to-point); the last stage scores the next tokens over
its vocabulary slice and broadcasts the scores to the other stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from mtnlg.checkpoint.reader import open_checkpoint, resolve_model
from mtnlg.parallel import ParallelState
from mtnlg.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.parallel.mappings import group_rank, group_size


def build_model(checkpoint: str, iteration: int | None, ps: ParallelState, device: torch.device,
                dtype: torch.dtype = torch.float32):
    """(this rank's module, its model config, the checkpoint) for layout ``ps``."""
    from mtnlg.checkpoint.loader import load_model
    from mtnlg.model.layout import stage_specs

    ckpt = open_checkpoint(checkpoint, iteration)
    cfg = resolve_model(ckpt.run_config, ps.tp_size, ps.pp_size, ckpt.tag_dir)
    cfg = dataclasses.replace(cfg, recompute="none", hidden_dropout=0.0, attention_dropout=0.0)
    specs = None if ps.pp_size == 1 else stage_specs(cfg, ps.pp_size, ps.pp_rank)
    return load_model(ckpt, cfg, ps, device, dtype, specs), cfg, ckpt


def _stage_rank(ps: ParallelState, stage: int) -> int:
    return ps.dims.rank_of(tp=ps.tp_rank, pp=stage, dp=ps.dp_rank)


class NativeScorer:
    """Next-token log-probabilities from an mtnlg model in any (tp, pp) layout; every rank gets the scores."""

    def __init__(self, module, cfg, ps: ParallelState, encode: Callable[[str], list[int]], device: torch.device,
                 batch_size: int = 8):
        self.module, self.cfg, self.ps, self._encode = module, cfg, ps, encode
        self.device, self.batch_size = device, batch_size
        self.max_length = cfg.seq_length
        self.dtype = next(module.parameters()).dtype

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def _local_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """This rank's vocabulary slice of the logits on the last stage, None elsewhere."""
        ps = self.ps
        if ps.pp_size == 1:
            return self.module.hidden_and_logits(x)
        if ps.is_first_stage:
            h = x
        else:  # under sequence parallelism stages pass this rank's (B, T/tp, C) shard
            T = x.size(1) // ps.tp_size if ps.sequence_parallel else x.size(1)
            h = torch.empty(x.size(0), T, self.cfg.hidden_size, device=self.device, dtype=self.dtype)
            dist.recv(h, src=_stage_rank(ps, ps.pp_rank - 1))
        run = getattr(self.module, "hidden_and_logits", self.module)  # a model stage or DeepSpeed's PipelineModule
        out = run(h)  # this stage's layers
        if not ps.is_last_stage:
            dist.send(out.contiguous(), dst=_stage_rank(ps, ps.pp_rank + 1))
            return None
        return out

    @torch.no_grad()
    def score(self, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[tuple[np.ndarray, np.ndarray]] = []
        ps, tp_group = self.ps, self.ps.tp_group
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            width = max(len(s) for s in chunk)
            if ps.sequence_parallel:  # the inputs (width - 1 tokens) split evenly over tp; padding goes right
                width = 1 + -(-(width - 1) // ps.tp_size) * ps.tp_size
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
            ids = ids.to(self.device)
            x, target = ids[:, :-1], ids[:, 1:]
            logits = self._local_logits(x)
            scores = torch.empty(2, *target.shape, device=self.device)  # log-prob, greedy flag
            if logits is not None:
                logits = logits.float()
                scores[0] = -vocab_parallel_cross_entropy(logits, target, tp_group, self.cfg.vocab_size)
                scores[1] = _is_argmax(logits, target, tp_group, self.cfg.vocab_size)
            if ps.pp_size > 1:
                dist.broadcast(scores, src=_stage_rank(ps, ps.pp_size - 1), group=ps.pp_group)
            lp, greedy = scores[0].cpu().numpy(), scores[1].cpu().numpy() > 0.5
            for i, s in enumerate(chunk):
                out.append((lp[i, : len(s) - 1].astype(np.float64), greedy[i, : len(s) - 1]))
        return out


def _is_argmax(logits: torch.Tensor, target: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """1.0 where the target is the argmax of the full (unpadded) vocabulary, from vocab-parallel logits."""
    v_local = logits.size(-1)
    first = group_rank(group) * v_local
    col = torch.arange(first, first + v_local, device=logits.device)
    logits = logits.masked_fill(col >= vocab_size, float("-inf"))
    best = logits.max(-1).values
    local_t = target - first
    mine = (local_t >= 0) & (local_t < v_local)
    t_logit = torch.where(mine, logits.gather(-1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1),
                          torch.full_like(best, float("-inf")))
    if group_size(group) > 1:
        both = torch.stack([best, t_logit])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        best, t_logit = both[0], both[1]
    return (t_logit >= best).float()
