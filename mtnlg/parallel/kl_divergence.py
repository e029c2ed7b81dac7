"""KL(teacher || student) over logits whose vocabulary dimension is split across the tp group.

For one token, with p = softmax(teacher / T) and q = softmax(student / T) over the unpadded vocabulary,

    KL(p || q) = sum_v p_v (log p_v - log q_v)

Each rank holds both models' logits for the same slice of the padded vocabulary (same padded size, same tp);
the full logits are never gathered. As in ``mtnlg.parallel.cross_entropy``, rows are processed in chunks of a
few MB, each converted to fp32 only while it is worked on, and padding columns (past ``vocab_size``) are excluded:

- forward, pass 1: per chunk the local log-sum-exp of both models' scaled rows; across tp ranks they are combined
  (one all-reduce MAX of the two row maxima, one all-reduce SUM of the two rows of exponentials);
- forward, pass 2: per chunk ``sum_v p_v (log p_v - log q_v)`` over the local columns with the global log-sum-exps,
  then one all-reduce SUM (one value per row). Summing the per-column terms (rather than
  ``sum p (t - s) / T - lse_t + lse_s``) avoids cancelling large numbers when the two distributions are close;
- backward: d KL / d student_v = (q_v - p_v) / T, recomputed per chunk from the saved logits and log-sum-exps.
  The teacher gets no gradient (it is frozen).

Three all-reduces of one or two values per row: the communication of the cross entropy plus one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtnlg.parallel.cross_entropy import _chunk_rows
from mtnlg.parallel.mappings import group_rank, group_size


def _valid_columns(v_local: int, vocab_size: int, group) -> int:
    """Local columns before the vocabulary padding (0: this rank's slice is all padding)."""
    start = group_rank(group) * v_local
    return min(max(vocab_size - start, 0), v_local)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, group, vocab_size, temperature):
        if student.shape != teacher.shape:
            raise ValueError(f"student logits {list(student.shape)} and teacher logits {list(teacher.shape)} differ "
                             "in shape; both must be this rank's slice of the same padded vocabulary")
        v_local = student.size(-1)
        s = student.reshape(-1, v_local)  # (N, v_local)
        t = teacher.reshape(-1, v_local)
        n = s.size(0)
        valid = _valid_columns(v_local, vocab_size, group)
        inv_t = 1.0 / temperature
        rows = _chunk_rows(s, valid)

        # pass 1: each row's local log-sum-exp of teacher / T and student / T
        lse = torch.full((2, n), float("-inf"), dtype=torch.float32, device=s.device)  # [teacher, student]
        for r in range(0, n if valid else 0, rows):
            lse[0, r : r + rows] = torch.logsumexp(t[r : r + rows, :valid].float() * inv_t, dim=-1)
            lse[1, r : r + rows] = torch.logsumexp(s[r : r + rows, :valid].float() * inv_t, dim=-1)
        if group_size(group) > 1:
            gmax = lse.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
            sums = (lse - gmax).exp()
            dist.all_reduce(sums, group=group)
            lse = gmax + sums.log()

        # pass 2: sum over the local columns of p (log p - log q)
        kl = torch.zeros(n, dtype=torch.float32, device=s.device)
        for r in range(0, n if valid else 0, rows):
            log_p = t[r : r + rows, :valid].float() * inv_t - lse[0, r : r + rows, None]
            log_q = s[r : r + rows, :valid].float() * inv_t - lse[1, r : r + rows, None]
            kl[r : r + rows] = (log_p.exp() * (log_p - log_q)).sum(-1)
            del log_p, log_q
        if group_size(group) > 1:
            dist.all_reduce(kl, group=group)

        ctx.save_for_backward(student, teacher, lse)
        ctx.valid, ctx.inv_t = valid, inv_t
        return kl.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, lse = ctx.saved_tensors
        valid, inv_t = ctx.valid, ctx.inv_t
        v_local = student.size(-1)
        s, t = student.reshape(-1, v_local), teacher.reshape(-1, v_local)
        g = grad_kl.reshape(-1).float() * inv_t  # (N,): d KL / d s = (q - p) / T
        grad = torch.empty_like(s)
        if valid < v_local:
            grad[:, valid:] = 0
        rows = _chunk_rows(s, valid)
        for r in range(0, s.size(0) if valid else 0, rows):
            q = (s[r : r + rows, :valid].float() * inv_t - lse[1, r : r + rows, None]).exp_()
            q.sub_((t[r : r + rows, :valid].float() * inv_t - lse[0, r : r + rows, None]).exp_())
            grad[r : r + rows, :valid] = q.mul_(g[r : r + rows, None])
            del q
        return grad.view(student.shape), None, None, None, None


def vocab_parallel_kl_divergence(student: torch.Tensor, teacher: torch.Tensor, group, vocab_size: int,
                                 temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(softmax(teacher / T) || softmax(student / T)) in fp32, shape ``student.shape[:-1]``, from this
    rank's vocabulary slice of both logits (``group``: the tp group, None for one process). Differentiable in
    ``student`` only; not scaled by T^2 (the caller decides)."""
    return _VocabParallelKL.apply(student, teacher.detach(), group, vocab_size, float(temperature))
