"""Cross-entropy over logits whose vocabulary dimension is split across the tp group.

Each rank holds logits for its slice of the padded vocabulary; the full logits are never
gathered. Entries past ``vocab_size`` (padding) are excluded, so the loss equals
``F.cross_entropy`` on the unpadded logits whatever the padding (and so whatever tp is).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtnlg.parallel.mappings import group_rank, group_size


def _reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index):
        logits = logits.float()
        v_local = logits.size(-1)
        start = group_rank(group) * v_local
        pad_from = vocab_size - start  # local index where padding starts
        if pad_from < v_local:
            logits = logits.clone()
            logits[..., max(pad_from, 0) :] = float("-inf")
        row_max = _reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)  # (..., v_local)

        local_t = target - start
        mine = (local_t >= 0) & (local_t < v_local)
        idx = local_t.clamp(0, v_local - 1).unsqueeze(-1)
        target_logit = _reduce(torch.where(mine, shifted.gather(-1, idx).squeeze(-1), 0.0), group)

        exp = shifted.exp()
        sum_exp = _reduce(exp.sum(dim=-1), group)
        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), idx, mine & ~ignored, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, idx, mine, ignored = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx, -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group, vocab_size: int, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token loss (fp32, same shape as ``target``); ``ignore_index`` tokens get 0."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, ignore_index)
