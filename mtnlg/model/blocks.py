"""A transformer block with tensor-parallel attention and MLP.

    x = x + dropout(attn(norm1(x)))
    x = x + dropout(mlp(norm2(x)))

Shapes are batch-first: x is (B, T, C). Inside attention each tp rank holds
``nh / tp`` query heads and ``nkv / tp`` key/value heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.documents import document_mask, segment_positions, split_inputs
from mtnlg.model.kv_cache import KVSlot
from mtnlg.parallel import ColumnParallelLinear, Init, ParallelState, RowParallelLinear, TPRandom, replicated
from mtnlg.parallel.layers import sequence_shard_dropout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm or RMSNorm over the hidden size; its parameters are replicated over tensor parallelism."""
    if cfg.norm == "layernorm":
        return replicated(nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps))
    return replicated(RMSNorm(cfg.hidden_size, cfg.norm_eps))


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, hd) in the rotate-half layout used by Hugging Face Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd). Rotates the pairs (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


UNFUSED_MAX_SEQ = 1024


def use_unfused_attention(q: torch.Tensor) -> bool:
    """True where attention on ``q`` (B, h, T, d) should be two batched GEMMs around an fp32 softmax (what
    Megatron's fused-softmax path and HF's eager attention compute) instead of torch's flash kernel: bf16 on a
    CPU, where it is faster (benchmarks/README.md, "Measurements behind code choices"), up to
    ``UNFUSED_MAX_SEQ`` tokens (the T x T probabilities are kept for the backward). Accelerators keep flash."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.size(-2) <= UNFUSED_MAX_SEQ


def causal_bias(T: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (the future)."""
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)


def unfused_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for (B, h, T, d) tensors (k, v may have fewer heads: GQA).

    ``bias`` is ``causal_bias(T, ...)`` (made here when not given): an additive mask, cheaper on a CPU than
    ``masked_fill_`` with a boolean mask (benchmarks/README.md)."""
    if k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    T = q.size(-2)
    if bias is None:
        bias = causal_bias(T, q.dtype, q.device)
    scores = (q * (q.size(-1) ** -0.5)) @ k.transpose(-1, -2)  # (B, h, T, T)
    # bf16 in and out; torch's CPU softmax accumulates in fp32 (as Megatron's fused softmax kernels do)
    probs = torch.softmax(scores.add_(bias), dim=-1)
    return probs @ v


class ParallelAttention(nn.Module):
    """Causal self-attention; heads split across tp ranks; GQA when num_kv_heads < heads. Under sequence parallelism
    it takes and returns (B, T/tp, C) sequence shards (the QKV projection gathers them, the output one scatters)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init, name: str):
        super().__init__()
        tp = ps.tp_size
        self.cfg, self.rng = cfg, rng
        hd = cfg.head_dim
        self.n_heads = cfg.num_attention_heads // tp  # local query heads
        self.n_kv = cfg.num_kv_heads // tp  # local key/value heads
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size,
            [cfg.num_attention_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd],
            tp_group=ps.tp_group, init=init, name=f"{name}.qkv", bias=cfg.qkv_bias,
            sequence_parallel=ps.sequence_parallel,
        )
        self.proj = RowParallelLinear(
            cfg.num_attention_heads * hd, cfg.hidden_size,
            tp_group=ps.tp_group, init=init, name=f"{name}.proj", bias=cfg.bias,
            std=cfg.init_std / math.sqrt(2 * cfg.num_layers), sequence_parallel=ps.sequence_parallel,
        )
        self._rope_cache: tuple | None = None
        self._bias_cache: torch.Tensor | None = None

    def _rope(self, T: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._rope_cache
        if c is None or c[0].size(0) < T or c[0].device != device or c[0].dtype != dtype:
            c = rope_cos_sin(max(T, self.cfg.seq_length), self.cfg.head_dim, self.cfg.rope_theta, device, dtype)
            self._rope_cache = c
        return c[0][:T], c[1][:T]

    def _causal_bias(self, T: int, device, dtype) -> torch.Tensor:
        b = self._bias_cache
        if b is None or b.size(0) != T or b.device != device or b.dtype != dtype:
            b = self._bias_cache = causal_bias(T, dtype, device)
        return b

    def forward(self, x: torch.Tensor, kv: KVSlot | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); ``segments`` (B, T): packed documents (``mtnlg.model.documents``), attention stays in each
        and positions restart at each."""
        hd = self.cfg.head_dim
        qkv = self.qkv(x)  # (B, T, (nh + 2 nkv) hd / tp): the whole sequence
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.cfg.position_embedding == "rope":
            if kv is None and segments is None:
                cos, sin = self._rope(T, x.device, q.dtype)
            else:  # each row continues from its own position (decoding) or restarts at each document (packing)
                pos = kv.new_pos if kv is not None else segment_positions(segments)  # (B, T)
                table_cos, table_sin = self._rope(int(pos.max()) + 1, x.device, q.dtype)
                cos, sin = table_cos[pos].unsqueeze(1), table_sin[pos].unsqueeze(1)  # (B, 1, T, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # incremental decoding (inference only)
            k, v, mask = kv.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        else:
            mask = None if segments is None else document_mask(segments)  # (B, 1, T, T)
            if self.cfg.recompute == "selective" and self.training and torch.is_grad_enabled():
                y = self.rng.checkpoint(self._core, q, k, v, mask)  # keep q, k, v; recompute scores ... AV
            else:
                y = self._core(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * hd)  # (B, T, C/tp)
        return self.proj(y)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
              ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + causal mask), dropout, times v: (B, nh, T, hd) from q (B, nh, T, hd) and
        k, v (B, nkv, T, hd). ``mask`` (B, 1, T, T), True = may attend: a document mask replacing the causal one."""
        p = self.cfg.attention_dropout if self.training else 0.0
        gqa = self.n_kv != self.n_heads
        causal = mask is None
        if p > 0:  # attention probabilities are sharded by head: use the tp stream
            with self.rng.fork(q.device):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                      enable_gqa=gqa)
        if use_unfused_attention(q):
            bias = self._causal_bias(q.size(-2), q.device, q.dtype) if causal else \
                torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            return unfused_causal_attention(q, k, v, bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class ParallelMLP(nn.Module):
    """GELU(tanh) MLP (gpt2) or SwiGLU with a fused [gate; up] projection (llama); sequence shards in and out under
    sequence parallelism."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init, name: str):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        ffn = cfg.ffn_hidden_size
        self.fc = ColumnParallelLinear(
            cfg.hidden_size, [ffn, ffn] if self.swiglu else [ffn],
            tp_group=ps.tp_group, init=init, name=f"{name}.fc", bias=cfg.bias, sequence_parallel=ps.sequence_parallel,
        )
        self.proj = RowParallelLinear(
            ffn, cfg.hidden_size, tp_group=ps.tp_group, init=init, name=f"{name}.proj", bias=cfg.bias,
            std=cfg.init_std / math.sqrt(2 * cfg.num_layers), sequence_parallel=ps.sequence_parallel,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, ffn/tp) or (B, T, 2*ffn/tp)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init, layer_number: int):
        super().__init__()
        name = self.group = f"layers.{layer_number}"  # its parameter group (checkpoints, converters)
        self.layer_number = layer_number
        self.dropout = cfg.hidden_dropout
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.norm1 = make_norm(cfg)
        self.attn = ParallelAttention(cfg, ps, rng, init, f"{name}.attn")
        self.norm2 = make_norm(cfg)
        self.mlp = ParallelMLP(cfg, ps, init, f"{name}.mlp")

    def forward_flops(self, seq: int) -> float:
        """Forward FLOPs per token at full (tp = 1) size (Narayanan et al. 2021): 2 per multiply-add of every matrix
        (read off the parameters' shardings) plus the attention core, QK^T and AV: 4 x seq x the query width."""
        mats = sum(math.prod(p.sharding.full_shape) for p in self.parameters()
                   if p.sharding.kind != "replicated" and len(p.sharding.full_shape) == 2)
        return 2.0 * mats + 4.0 * seq * self.attn.qkv.weight.sharding.blocks[0]

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return sequence_shard_dropout(x, self.dropout, self.training, self.tp_group)
        return F.dropout(x, self.dropout, self.training)

    def forward_args(self, *args: torch.Tensor) -> torch.Tensor | tuple:
        """``forward`` of the input given as separate tensors (x, or x and segment ids): what a checkpoint passes."""
        return self(args if len(args) > 1 else args[0])

    def forward(self, x: torch.Tensor | tuple, kv: KVSlot | None = None) -> torch.Tensor | tuple:
        """x (B, T, C), or this rank's (B, T/tp, C) sequence shard under sequence parallelism; or the pair
        (x, segment_ids (B, T)) of packed documents, returned as a pair (``mtnlg.model.documents``)."""
        x, segments = split_inputs(x)
        x = x + self._dropout(self.attn(self.norm1(x), kv, segments))
        x = x + self._dropout(self.mlp(self.norm2(x)))
        return x if segments is None else (x, segments)
