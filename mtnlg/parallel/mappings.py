"""Autograd-aware collectives for the tensor-parallel region (Megatron's f and g operators), and for
sequence parallelism (Korthikanti et al. 2022): activations split along the sequence (dim 1 of a
batch-first (B, T, C) tensor) between the tensor-parallel regions, all-gathered into them and
reduce-scattered out of them.

Each takes its process group explicitly; ``group=None`` (or a group of one) means no
communication, so the same model code runs in a single process with no distributed setup.
Nothing here calls a device API: buffers are allocated on ``tensor.device``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# gloo (CPU), inference: a tensor up to this size is summed faster as an all-gather and a local sum than by gloo's
# all-reduce, which costs ~2 ms whatever the size on a 2-core machine (all-gather ~0.8 ms at 6-64 KB; the all-reduce
# wins from ~0.5 MB on). Decoding a few tokens, as the server does, all-reduces only a few KB per block. Training
# keeps the all-reduce (no gathered copies at its memory peak).
GLOO_GATHER_BYTES = 256 * 1024


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` over ``group`` in place (x must not be needed elsewhere). Every rank gets the same bits."""
    n = group_size(group)
    if n > 1:
        x = x.contiguous()
        if (torch.is_inference_mode_enabled() and x.numel() * x.element_size() <= GLOO_GATHER_BYTES
                and dist.get_backend(group) == "gloo"):
            parts = [torch.empty_like(x) for _ in range(n)]
            dist.all_gather(parts, x, group=group)
            x.copy_(parts[0])
            for part in parts[1:]:  # in rank order on every rank; no buffer beyond the gathered parts
                x.add_(part)
        else:
            dist.all_reduce(x, group=group)
    return x


def gather_dim(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim``, in rank order."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def split_dim(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def reduce_scatter_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The sum of ``x`` over the group, of which this rank keeps its chunk along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    inp = x.movedim(dim, 0).contiguous()
    out = inp.new_empty(inp.size(0) // n, *inp.shape[1:])
    dist.reduce_scatter_tensor(out, inp, group=group)
    return out.movedim(0, dim).contiguous()


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    return gather_dim(x, group, -1)


def split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    return split_dim(x, group, -1)


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the tp group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: sum over the tp group. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_last_dim(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return split_last_dim(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


SEQ_DIM = 1  # batch-first activations: (B, T, C)


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the sequence shards. Backward: reduce-scatter the gradient (sum over the group, keep
    this rank's shard): what ``copy_to_tp``'s all-reduce is when the input was split by sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim(grad, ctx.group, SEQ_DIM), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: sum the partial results over the group, keep this rank's sequence shard. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return gather_dim(grad, ctx.group, SEQ_DIM), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/tp, ...) sequence shards -> (B, T, ...) on every rank (sequence parallelism into a TP region)."""
    return x if group_size(group) == 1 else _GatherSequence.apply(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, ...) partial sums -> this rank's (B, T/tp, ...) shard of their sum (out of a TP region)."""
    return x if group_size(group) == 1 else _ReduceScatterSequence.apply(x, group)
