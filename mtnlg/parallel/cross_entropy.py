"""Cross-entropy over logits whose vocabulary dimension is split across the tp group.

Each rank holds logits for its slice of the padded vocabulary; the full logits are never
gathered. Entries past ``vocab_size`` (padding) are excluded, so the loss equals
``F.cross_entropy`` on the unpadded logits whatever the padding (and so whatever tp is).

The logits are the largest activation of a GPT (tokens x vocabulary), so this is written
to touch them as little as possible: no fp32 copy of them is ever made. Rows are processed
in chunks of a few MB, each converted to fp32 only while it is worked on:

- forward: per chunk one fused ``log_softmax`` gives the local log-sum-exp of every row
  and the target's log-probability; across tp ranks the row log-sum-exps are combined
  (max, then sum of exponentials: two small all-reduces of one value per row);
- backward: the softmax is recomputed per chunk from the saved logits (no fp32 softmax is
  kept between forward and backward), scaled, the target's 1 subtracted, and written
  once into the gradient in the logits' dtype.

The arithmetic is fp32 throughout, as in ``F.cross_entropy(logits.float(), ...)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtnlg.parallel.mappings import group_rank, group_size

CHUNK_ELEMENTS_CPU = 1 << 21  # fp32 chunk of ~8 MB: stays in the last-level cache
CHUNK_ELEMENTS_DEVICE = 1 << 28  # accelerators: few, large kernels


def _chunk_rows(logits: torch.Tensor, v_local: int) -> int:
    budget = CHUNK_ELEMENTS_CPU if logits.device.type == "cpu" else CHUNK_ELEMENTS_DEVICE
    return max(1, budget // max(v_local, 1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index):
        v_local = logits.size(-1)
        x = logits.reshape(-1, v_local)  # (N, v_local), a view when logits are contiguous
        t = target.reshape(-1)
        n = x.size(0)
        tp = group_size(group)
        start = group_rank(group) * v_local
        valid = min(max(vocab_size - start, 0), v_local)  # local columns before the padding (0: all padding)

        local_t = t - start
        mine = (local_t >= 0) & (local_t < valid)
        idx = local_t.clamp(0, max(valid - 1, 0)).unsqueeze(-1)  # (N, 1)

        target_lp = torch.zeros(n, dtype=torch.float32, device=x.device)  # log p(target), local softmax
        local_lse = torch.full((n,), float("-inf"), device=x.device) if tp > 1 else None
        rows = _chunk_rows(x, valid)
        for r in range(0, n if valid else 0, rows):
            chunk = x[r : r + rows, :valid]
            lsm = torch.log_softmax(chunk, dim=-1, dtype=torch.float32)  # (rows, valid), fp32
            target_lp[r : r + rows] = lsm.gather(-1, idx[r : r + rows]).squeeze(-1)
            if local_lse is not None:  # lse = x_j - lsm_j, taken at the row max (smallest rounding)
                local_lse[r : r + rows] = chunk.amax(-1).float() - lsm.amax(-1)

        ignored = t == ignore_index
        if local_lse is None:
            loss = -target_lp
            log_scale = None
        else:
            gmax = local_lse.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
            # sum over ranks of exp(local lse - max) and of the owner's target logit, in one call
            target_logit = torch.where(mine, target_lp + local_lse, 0.0) if valid else torch.zeros_like(gmax)
            sums = torch.stack([(local_lse - gmax).exp(), target_logit])
            dist.all_reduce(sums, group=group)
            lse = gmax + sums[0].log()
            loss = lse - sums[1]
            log_scale = local_lse - lse  # local softmax -> global softmax
        loss = loss.masked_fill(ignored, 0.0)

        ctx.save_for_backward(logits, idx, mine & ~ignored, ignored, log_scale)
        ctx.valid = valid
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, idx, owned, ignored, log_scale = ctx.saved_tensors
        valid = ctx.valid
        v_local = logits.size(-1)
        x = logits.reshape(-1, v_local)
        g = grad_loss.reshape(-1).float().masked_fill(ignored, 0.0)  # (N,)
        scale = g if log_scale is None else g * log_scale.exp()
        hit = torch.where(owned, -g, 0.0).unsqueeze(-1)  # minus the one-hot, on the owning rank
        grad = torch.empty_like(x)
        if valid < v_local:
            grad[:, valid:] = 0
        rows = _chunk_rows(x, valid)
        for r in range(0, x.size(0) if valid else 0, rows):
            p = torch.softmax(x[r : r + rows, :valid], dim=-1, dtype=torch.float32)
            p.mul_(scale[r : r + rows].unsqueeze(-1))
            p.scatter_add_(-1, idx[r : r + rows], hit[r : r + rows])
            grad[r : r + rows, :valid] = p
            del p  # before the next chunk's softmax: at most one chunk (and its fp32 input) alive
        return grad.view(logits.shape), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group, vocab_size: int, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token loss (fp32, same shape as ``target``); ``ignore_index`` tokens get 0."""
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_size, ignore_index)
