"""Megatron tensor-parallel layers: column/row-parallel linear and the vocab-parallel embedding.

Weights are initialised layout-independently: each *full* logical tensor is drawn from a
generator seeded by (seed, parameter name) on the CPU, and every rank keeps its slice. A model
built at tp=1 therefore equals the concatenation of the same model built at tp=2, whatever
the pipeline split or device.

Every parameter carries how it is laid out over the tensor-parallel group, set where it is made:
``param.sharding`` (a ``Sharding``: replicated, column, row or vocabulary-parallel, its full
shape and fused sub-blocks). Checkpoint readers and writers, converters, DeepSpeed's
universal-checkpoint metadata and parameter counts all read it (``mtnlg.model.layout``) instead
of keeping tables of their own. Split parameters also carry DeepSpeed's
``tensor_model_parallel = True`` and ``partition_dim`` (its gradient-norm code reads them).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.parallel.mappings import (
    SEQ_DIM,
    all_reduce,
    copy_to_tp,
    gather_dim,
    gather_from_tp,
    group_rank,
    group_size,
    reduce_from_tp,
    reduce_scatter_dim,
    reduce_scatter_sequence,
    scatter_to_tp,
)


@dataclass(frozen=True)
class Init:
    """Layout-independent weight init: the full tensor is a function of (seed, name) only.

    It is made of blocks of whole rows (about ``BLOCK_ELEMENTS`` each), every block drawn from its own generator
    seeded by (seed, name, block), so a rank draws only the blocks its shard touches and never holds more of the
    full tensor than one block: a vocabulary of 128k x 8k is never whole on any rank."""

    seed: int = 1234
    std: float = 0.02
    BLOCK_ELEMENTS = 1 << 20

    def normal(self, name: str, shape: Sequence[int], std: float | None = None) -> torch.Tensor:
        """The whole tensor (small ones: position embeddings)."""
        return self.rows(name, shape, 0, shape[0], std)

    def rows(self, name: str, shape: Sequence[int], start: int, stop: int, std: float | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of the full tensor of ``shape`` (written into ``out`` when given)."""
        width = math.prod(shape[1:])
        per = max(1, self.BLOCK_ELEMENTS // max(width, 1))
        out = torch.empty((stop - start, *shape[1:])) if out is None else out
        if out.is_meta:  # a model built for its shapes only (mtnlg.model.layout)
            return out
        for b in range(start // per, -(-stop // per)):
            lo, hi = b * per, min((b + 1) * per, shape[0])
            gen = torch.Generator(device="cpu")
            gen.manual_seed((self.seed * 1_000_003 + zlib.crc32(f"{name}#{b}".encode())) % (2**63))
            block = torch.randn((hi - lo, *shape[1:]), generator=gen)
            a, z = max(lo, start), min(hi, stop)
            out[a - start : z - start] = block[a - lo : z - lo]
        return out.mul_(self.std if std is None else std)

    def shard(self, name: str, shape: Sequence[int], dim: int, index: int, parts: int,
              std: float | None = None) -> torch.Tensor:
        """Part ``index`` of ``parts`` equal parts of the full tensor split along ``dim`` (0 or 1)."""
        if dim == 0:
            n = shape[0] // parts
            return self.rows(name, shape, index * n, (index + 1) * n, std)
        n = shape[1] // parts
        out = torch.empty((shape[0], n, *shape[2:]))
        if out.is_meta:
            return out
        per = max(1, self.BLOCK_ELEMENTS // max(math.prod(shape[1:]), 1))
        for lo in range(0, shape[0], per):  # whole rows one block at a time, this part's columns kept
            hi = min(lo + per, shape[0])
            out[lo:hi] = self.rows(name, shape, lo, hi, std)[:, index * n : (index + 1) * n]
        return out


@dataclass(frozen=True)
class Sharding:
    """How one parameter is laid out over the tensor-parallel group.

    kind: ``replicated`` (whole on every rank), ``column`` (split along dim 0, the output features),
        ``row`` (split along dim 1, the input features) or ``vocab`` (the rows of a padded vocabulary
        split along dim 0; the padding rows are zeros, not part of the model)
    full_shape: the merged (tp = 1) shape, vocabulary unpadded
    blocks: fused sub-blocks along ``dim`` (full sizes, e.g. [q, k, v] or [gate, up]), each split on its own
    """

    kind: str
    full_shape: tuple[int, ...]
    dim: int = 0
    blocks: tuple[int, ...] | None = None

    def local_shape(self, tp: int, padded_rows: int | None = None) -> tuple[int, ...]:
        """The shape one of ``tp`` ranks holds (``padded_rows``: the padded vocabulary, for ``vocab``)."""
        shape = list(self.full_shape)
        if self.kind == "vocab":
            shape[0] = (padded_rows or shape[0]) // tp
        elif self.kind != "replicated":
            shape[self.dim] //= tp
        return tuple(shape)


def set_sharding(param: nn.Parameter, sharding: Sharding) -> nn.Parameter:
    """Record ``sharding`` on ``param`` (and DeepSpeed's attributes for split parameters)."""
    param.sharding = sharding
    if sharding.kind != "replicated":
        param.tensor_model_parallel = True
        param.partition_dim = sharding.dim
        param.partition_stride = 1
    return param


def sum_replicated_grads(module: nn.Module, tp_group) -> int:
    """Sequence parallelism: every replicated parameter (norms, row-parallel biases, positions) is applied to this
    rank's sequence shard only, so its gradient is a partial sum; add a hook that sums it over the tensor-parallel
    group as backward produces it (before DeepSpeed accumulates or reduces it). Returns how many."""
    if group_size(tp_group) == 1:
        return 0
    hooked = 0
    for p in module.parameters():
        if getattr(p, "sharding", None) is not None and p.sharding.kind == "replicated" and p.requires_grad:
            p.register_hook(lambda g, group=tp_group: all_reduce(g.clone(), group))
            hooked += 1
    return hooked


def sequence_shard_dropout(x: torch.Tensor, p: float, training: bool, tp_group) -> torch.Tensor:
    """Dropout on this rank's (B, T/tp, C) sequence shard with the mask that dropout of the whole (B, T, C) tensor
    draws from the default generator (the same on every tp rank), cut to the shard: every layout, with or without
    sequence parallelism, drops the same elements."""
    n = group_size(tp_group)
    if not training or p == 0.0 or n == 1:
        return F.dropout(x, p, training)
    full = (x.size(0), x.size(1) * n, *x.shape[2:])
    keep = torch.empty(full, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    keep = keep.narrow(1, group_rank(tp_group) * x.size(1), x.size(1))
    return x * keep.to(x.dtype).div_(1.0 - p)


def replicated(module: nn.Module) -> nn.Module:
    """Mark every parameter of ``module`` (and its children) that has no sharding as replicated over tp."""
    for p in module.parameters():
        if not hasattr(p, "sharding"):
            set_sharding(p, Sharding("replicated", tuple(p.shape)))
    return module


def shard_tensor(full: torch.Tensor, dim: int, sizes: Sequence[int] | None, rank: int, size: int) -> torch.Tensor:
    """The slice rank ``rank`` of ``size`` holds of a full tensor split along ``dim``.

    With ``sizes`` (logical blocks along ``dim``, e.g. [q, k, v]) each block is split
    separately and the local pieces concatenated, as ColumnParallelLinear stores them.
    """
    blocks = full.split(list(sizes), dim=dim) if sizes else [full]
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim)


def merge_shards(shards: Sequence[torch.Tensor], dim: int, sizes: Sequence[int] | None) -> torch.Tensor:
    """Inverse of ``shard_tensor``: the full tensor from every rank's slice, in rank order."""
    if not sizes:
        return torch.cat(list(shards), dim=dim)
    n = len(shards)
    local = [s // n for s in sizes]
    pieces = [sh.split(local, dim=dim) for sh in shards]  # pieces[rank][block]
    return torch.cat([torch.cat([p[b] for p in pieces], dim=dim) for b in range(len(sizes))], dim=dim)


class _SequenceGatherLinear(torch.autograd.Function):
    """y = all-gather(x over the sequence) @ weight^T (+ bias), keeping only this rank's sequence shard of x for the
    backward, which gathers it again (Megatron's sequence parallelism does the same): the gathered (B, T, in) input
    of a column-parallel layer is never held between forward and backward, only its (B, T/tp, in) shard."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(gather_dim(x, group, SEQ_DIM), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = gather_dim(x, ctx.group, SEQ_DIM)  # (B, T, in)
        grad_x = reduce_scatter_dim(grad @ weight, ctx.group, SEQ_DIM)  # summed over tp, this rank's shard
        grad_w = grad.flatten(0, -2).t() @ full.flatten(0, -2)
        grad_b = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def sequence_gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """(B, T/tp, in) sequence shards -> (B, T, out_local): a column-parallel layer's forward under sequence
    parallelism (see ``_SequenceGatherLinear``)."""
    if group_size(group) == 1:
        return F.linear(x, weight, bias)
    return _SequenceGatherLinear.apply(x, weight, bias, group)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) across the tp group.

    ``out_sizes`` lists logical output blocks that are each split across ranks, e.g.
    [q, k, v] or [gate, up]: the local weight is [block0_r; block1_r; ...].
    The output stays sharded unless ``gather_output``.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        *,
        tp_group,
        init: Init,
        name: str,
        bias: bool = True,
        std: float | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        tp = group_size(tp_group)
        if any(s % tp for s in out_sizes):
            raise ValueError(f"{name}: output blocks {list(out_sizes)} not divisible by tp={tp}")
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel  # the input comes as sequence shards: all-gather it
        self.local_sizes = [s // tp for s in out_sizes]
        names = [f"{name}.weight.{i}" for i in range(len(out_sizes))] if len(out_sizes) > 1 else [f"{name}.weight"]
        rank = group_rank(tp_group)
        shards = [init.shard(n, (s, in_features), 0, rank, tp, std) for n, s in zip(names, out_sizes)]
        blocks = tuple(out_sizes) if len(out_sizes) > 1 else None
        self.weight = set_sharding(nn.Parameter(torch.cat(shards, dim=0)),
                                   Sharding("column", (sum(out_sizes), in_features), 0, blocks))
        if bias:
            self.bias = set_sharding(nn.Parameter(torch.zeros(sum(self.local_sizes))),
                                     Sharding("column", (sum(out_sizes),), 0, blocks))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) -- or (B, T/tp, in) shards under sequence parallelism -> (B, T, out/tp)."""
        if self.sequence_parallel:
            y = sequence_gather_linear(x, self.weight, self.bias, self.tp_group)
        else:
            y = F.linear(copy_to_tp(x, self.tp_group), self.weight, self.bias)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features); outputs summed over the tp group.

    The input is normally already sharded on its last dim (``input_is_parallel``), e.g. the
    output of a ColumnParallelLinear. The bias is replicated and added once, after the sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group,
        init: Init,
        name: str,
        bias: bool = True,
        std: float | None = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        if in_features % group_size(tp_group):
            raise ValueError(f"{name}: in_features {in_features} not divisible by tp={group_size(tp_group)}")
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel  # the sum leaves as sequence shards: reduce-scatter it
        weight = init.shard(f"{name}.weight", (out_features, in_features), 1, group_rank(tp_group),
                            group_size(tp_group), std)
        self.weight = set_sharding(nn.Parameter(weight), Sharding("row", (out_features, in_features), 1))
        self.bias = None
        if bias:  # added once, after the sum over the group: the same on every rank
            self.bias = set_sharding(nn.Parameter(torch.zeros(out_features)), Sharding("replicated", (out_features,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in/tp) -> (B, T, out) -- or this rank's (B, T/tp, out) shard under sequence parallelism."""
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)
        y = F.linear(x, self.weight)
        y = reduce_scatter_sequence(y, self.tp_group) if self.sequence_parallel else reduce_from_tp(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class _LookupIntoFp32Grad(torch.autograd.Function):
    """``F.embedding`` whose backward adds the looked-up rows' gradients (in fp32) straight into a
    given fp32 gradient buffer instead of returning a dense (vocab x hidden) gradient for the weight:
    a micro batch touches a few thousand of the vocabulary's rows, the dense path writes, adds and
    converts all of them (three passes over 39M numbers for GPT-2's vocabulary)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, fp32_grad: Callable[[], torch.Tensor]):
        ctx.save_for_backward(ids)
        ctx.fp32_grad = fp32_grad
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        buffer = ctx.fp32_grad()
        buffer.index_add_(0, ids.reshape(-1), grad_out.reshape(-1, grad_out.size(-1)).to(buffer.dtype))
        return None, None, None


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the padded vocabulary) are split across the tp group.

    Rows past ``vocab_size`` (padding) start at zero; ids are looked up on the rank owning
    them and the partial results summed over the group.

    ``fp32_grad``: set by the training engine where the optimizer keeps an fp32 gradient buffer
    for ``weight`` (bf16 training); the lookup's gradient then goes there row by row and the
    weight gets no dense bf16 gradient from it (the tied output layer still gives one).
    """

    fp32_grad: Callable[[], torch.Tensor] | None = None

    def __init__(self, vocab_size: int, padded_vocab_size: int, dim: int, *, tp_group, init: Init, name: str,
                 sequence_parallel: bool = False):
        super().__init__()
        tp = group_size(tp_group)
        if padded_vocab_size % tp or padded_vocab_size < vocab_size:
            raise ValueError(f"{name}: padded vocab {padded_vocab_size} invalid for vocab {vocab_size}, tp={tp}")
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel  # lookups leave, logits' inputs come, as sequence shards
        self.vocab_size = vocab_size
        self.per_rank = padded_vocab_size // tp
        self.start = group_rank(tp_group) * self.per_rank
        weight = torch.zeros(self.per_rank, dim)  # rows past vocab_size: padding, zeros
        stop = min(self.start + self.per_rank, vocab_size)
        if stop > self.start:
            init.rows(f"{name}.weight", (vocab_size, dim), self.start, stop, out=weight[: stop - self.start])
        self.weight = set_sharding(nn.Parameter(weight), Sharding("vocab", (vocab_size, dim)))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fp32_grad is not None and torch.is_grad_enabled() and self.weight.requires_grad:
            return _LookupIntoFp32Grad.apply(ids, self.weight, self.fp32_grad)
        return F.embedding(ids, self.weight)

    def forward(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, C); with ``logits=True``, hidden states (B, T, C) -> this rank's
        slice of the (padded) vocabulary logits (B, T, V_padded / tp), i.e. x @ weight^T (an output layer).
        Under sequence parallelism embeddings leave, and hidden states come, as (B, T/tp, C) sequence shards.

        Both go through the module call, so hooks on it see the weight used: ZeRO-3 gathers it for a tied
        output layer too (a method call past the hooks reads an empty partition outside the engine's forward)."""
        if logits:
            if self.sequence_parallel:
                return sequence_gather_linear(x, self.weight, None, self.tp_group)
            return F.linear(copy_to_tp(x, self.tp_group), self.weight)
        if group_size(self.tp_group) == 1:
            return self._lookup(x)
        local = x - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = self._lookup(local.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(out, self.tp_group)
        return reduce_from_tp(out, self.tp_group)
