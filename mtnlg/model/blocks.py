"""A transformer block with tensor-parallel attention (self, and optionally cross) and MLP.

    x = x + dropout(attn(norm1(x)))            # norm_position: pre (GPT, Megatron's BERT, T5)
    x = x + dropout(cross_attn(cross_norm(x), context))   # encoder-decoder decoders only
    x = x + dropout(mlp(norm2(x)))
    (post: x = norm(x + dropout(sublayer(x))) for each)

Shapes are batch-first: x is (B, T, C). Inside attention each tp rank holds
``nh / tp`` query heads and ``nkv / tp`` key/value heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model.documents import segment_positions
from mtnlg.model.kv_cache import KVSlot
from mtnlg.model.masks import MaskKind, cross_attention_mask, self_attention_mask
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, scale: float | None = None
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
    scores = (q * (q.size(-1) ** -0.5 if scale is None else scale)) @ k.transpose(-1, -2)  # (B, h, T, T)
    # bf16 in and out; torch's CPU softmax accumulates in fp32 (as Megatron's fused softmax kernels do)
    probs = torch.softmax(scores.add_(bias), dim=-1)
    return probs @ v


def with_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An additive attention mask: ``bias`` (1 or B, h, T, S) where boolean ``mask`` (B, 1, T, S) lets a query
    attend (everywhere when None), -inf elsewhere."""
    if mask is None:
        return bias
    return torch.where(mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))


class ParallelAttention(nn.Module):
    """Self-attention (``causal`` or ``bidirectional``: ``mtnlg.model.masks``), or with ``cross=True`` attention of
    x's queries over a ``context`` (an encoder's output; never causal, no RoPE). Heads split across tp ranks; GQA when
    num_kv_heads < heads. Under sequence parallelism it takes and returns (B, T/tp, C) sequence shards (the input
    projections gather them, the output one scatters). ``scale``: what the scores q k^T are multiplied by (None:
    1/sqrt(head_dim); T5: 1.0)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init, name: str,
                 mask: MaskKind = "causal", cross: bool = False, scale: float | None = None):
        super().__init__()
        self.scale = scale
        tp = ps.tp_size
        self.cfg, self.rng, self.causal, self.cross = cfg, rng, mask == "causal" and not cross, cross
        hd = cfg.head_dim
        self.n_heads = cfg.num_attention_heads // tp  # local query heads
        self.n_kv = cfg.num_kv_heads // tp  # local key/value heads
        q, kv = cfg.num_attention_heads * hd, cfg.num_kv_heads * hd
        column = {"tp_group": ps.tp_group, "init": init, "bias": cfg.qkv_bias,
                  "sequence_parallel": ps.sequence_parallel}
        if cross:  # queries from x, keys and values from the context
            self.q = ColumnParallelLinear(cfg.hidden_size, [q], name=f"{name}.q", **column)
            self.kv = ColumnParallelLinear(cfg.hidden_size, [kv, kv], name=f"{name}.kv", **column)
        else:
            self.qkv = ColumnParallelLinear(cfg.hidden_size, [q, kv, kv], name=f"{name}.qkv", **column)
        self.proj = RowParallelLinear(
            cfg.num_attention_heads * hd, cfg.hidden_size,
            tp_group=ps.tp_group, init=init, name=f"{name}.proj", bias=cfg.bias,
            std=cfg.init_std / math.sqrt(2 * cfg.num_layers), sequence_parallel=ps.sequence_parallel,
        )
        self._rope_cache: tuple | None = None
        self._bias_cache: torch.Tensor | None = None

    @property
    def query_width(self) -> int:
        """Query features at full (tp = 1) size: what the attention core's FLOPs scale with."""
        sharding = (self.q if self.cross else self.qkv).weight.sharding
        return sharding.blocks[0] if sharding.blocks else sharding.full_shape[0]  # cross: q alone, no blocks

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

    def _context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's keys and values of ``context``; without autograd (decoding) those of the context of the
        last call are kept and reused while the same tensor comes again (an encoder's output, once per token)."""
        cached = getattr(self, "_context_cache", None)
        if cached is not None and cached[0] is context and not torch.is_grad_enabled():
            return cached[1], cached[2]
        hd = self.cfg.head_dim
        k, v = self.kv(context).split([self.n_kv * hd, self.n_kv * hd], dim=-1)
        self._context_cache = (context, k, v) if not torch.is_grad_enabled() else None
        return k, v

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, n, self.cfg.head_dim).transpose(1, 2)  # (B, n, T, hd)

    def forward(self, x: torch.Tensor, kv: KVSlot | None = None, segments: torch.Tensor | None = None,
                padding: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_padding: torch.Tensor | None = None, position_bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, T, C); ``segments`` (B, T): packed documents (``mtnlg.model.documents``), attention stays in each
        and positions restart at each; ``padding`` (B, T): real tokens (True); ``context`` (B, S, C) and
        ``context_padding`` (B, S): what cross-attention attends to; ``position_bias`` (1 or B, nh/tp, T, S):
        added to the scores (T5's relative positions), this rank's heads."""
        hd = self.cfg.head_dim
        if self.cross:
            q = self.q(x)  # (B, T, nh hd / tp): the whole sequence
            k, v = self._context_kv(context)  # (B, S, nkv hd / tp) each
        else:
            q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        B, T = q.shape[:2]
        q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv), self._heads(v, self.n_kv)
        if self.cfg.position_embedding == "rope" and not self.cross:
            if kv is None and segments is None:
                cos, sin = self._rope(T, x.device, q.dtype)
            else:  # each row continues from its own position (decoding) or restarts at each document (packing)
                pos = kv.new_pos if kv is not None else segment_positions(segments)  # (B, T)
                table_cos, table_sin = self._rope(int(pos.max()) + 1, x.device, q.dtype)
                cos, sin = table_cos[pos].unsqueeze(1), table_sin[pos].unsqueeze(1)  # (B, 1, T, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # incremental decoding (inference only)
            k, v, mask = kv.append(k, v)
            if position_bias is not None:
                mask = with_bias(mask, position_bias)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads,
                                               scale=self.scale)
        else:
            if self.cross:
                mask = cross_attention_mask(context_padding, T)
            else:
                mask = self_attention_mask("causal" if self.causal else "bidirectional", T, x.device, segments,
                                           padding)
            if position_bias is not None:  # an additive mask: the bias where attending, -inf elsewhere
                if mask is None and self.causal:
                    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                mask = with_bias(mask, position_bias)
            if self.cfg.recompute == "selective" and self.training and torch.is_grad_enabled():
                y = self.rng.checkpoint(self._core, q, k, v, mask)  # keep q, k, v; recompute scores ... AV
            else:
                y = self._core(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * hd)  # (B, T, C/tp)
        return self.proj(y)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
              ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + mask), dropout, times v: (B, nh, T, hd) from q (B, nh, T, hd) and k, v
        (B, nkv, S, hd). ``mask`` (B, 1, T, S), True = may attend, or an additive float mask (``with_bias``); None:
        plain causal (or, for a bidirectional or cross attention, no) mask. (1/sqrt(hd): ``scale``.)"""
        p = self.cfg.attention_dropout if self.training else 0.0
        gqa = self.n_kv != self.n_heads
        causal = self.causal and mask is None
        if p > 0:  # attention probabilities are sharded by head: use the tp stream
            return self._dropped(q, k, v, mask, p)
        if use_unfused_attention(q):
            if causal:
                bias = self._causal_bias(q.size(-2), q.device, q.dtype)
            elif mask is None:
                bias = torch.zeros(q.size(-2), k.size(-2), dtype=q.dtype, device=q.device)
            elif mask.is_floating_point():
                bias = mask.to(q.dtype)
            else:
                bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            return unfused_causal_attention(q, k, v, bias, self.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                                              scale=self.scale)

    def _dropped(self, q, k, v, mask, p: float) -> torch.Tensor:
        with self.rng.fork(q.device):  # attention probabilities are sharded by head: use the tp stream
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                  is_causal=self.causal and mask is None,
                                                  enable_gqa=self.n_kv != self.n_heads, scale=self.scale)


class ParallelMLP(nn.Module):
    """GELU(tanh) MLP (gpt2), exact GELU (``gelu_erf``: BERT), ReLU MLP (the original T5), or a gated one with a
    fused [gate; up] projection: SwiGLU (llama) or GEGLU with tanh GELU (T5 v1.1's "gated-gelu"); sequence shards in
    and out under sequence parallelism. ``activation``: one of those (default ``cfg.activation``)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init, name: str, activation: str | None = None):
        super().__init__()
        self.activation = activation or cfg.activation
        self.gated = self.activation in ("swiglu", "geglu")
        self.approximate = "none" if self.activation == "gelu_erf" else "tanh"
        ffn = cfg.ffn_hidden_size
        self.fc = ColumnParallelLinear(
            cfg.hidden_size, [ffn, ffn] if self.gated else [ffn],
            tp_group=ps.tp_group, init=init, name=f"{name}.fc", bias=cfg.bias, sequence_parallel=ps.sequence_parallel,
        )
        self.proj = RowParallelLinear(
            ffn, cfg.hidden_size, tp_group=ps.tp_group, init=init, name=f"{name}.proj", bias=cfg.bias,
            std=cfg.init_std / math.sqrt(2 * cfg.num_layers), sequence_parallel=ps.sequence_parallel,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, ffn/tp) or (B, T, 2*ffn/tp)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.proj(h)


class TransformerBlock(nn.Module):
    """One transformer layer with slots: self-attention (causal or bidirectional), an optional cross-attention over
    a context, and the MLP, each a residual sub-layer normalised before (``model.norm_position: pre``) or after
    (``post``, the original Transformer and BERT) its residual sum.

    What travels with the hidden states (a tuple, through DeepSpeed's pipeline too) is named by ``carries``:
    the default is packed documents' ``("segments",)`` (x alone, or (x, segment_ids)); an encoder-decoder's
    decoder blocks carry e.g. ``("padding", "context", "context_padding")``; a carried ``position_bias`` is added to
    the self-attention scores (T5's relative positions). The block returns the tuple with x replaced.
    ``attention_scale``: what the attention scores are multiplied by (None: 1/sqrt(head_dim)); ``activation``: the
    MLP's (None: ``cfg.activation``)."""

    is_block = True  # the unit of full recompute and of pipeline balance (mtnlg.model.registry.is_block)

    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init, layer_number: int,
                 mask: MaskKind = "causal", cross_attention: bool = False, carries: tuple[str, ...] = ("segments",),
                 attention_scale: float | None = None, activation: str | None = None):
        super().__init__()
        name = self.group = f"layers.{layer_number}"  # its parameter group (checkpoints, converters)
        self.layer_number = layer_number
        self.dropout = cfg.hidden_dropout
        self.pre_norm = cfg.norm_position == "pre"
        self.carries = carries
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.norm1 = make_norm(cfg)
        self.attn = ParallelAttention(cfg, ps, rng, init, f"{name}.attn", mask=mask, scale=attention_scale)
        self.cross_norm = make_norm(cfg) if cross_attention else None
        self.cross_attn = ParallelAttention(cfg, ps, rng, init, f"{name}.cross_attn", cross=True,
                                            scale=attention_scale) if cross_attention else None
        self.norm2 = make_norm(cfg)
        self.mlp = ParallelMLP(cfg, ps, init, f"{name}.mlp", activation)

    def forward_flops(self, seq: int) -> float:
        """Forward FLOPs per token at full (tp = 1) size (Narayanan et al. 2021): 2 per multiply-add of every matrix
        (read off the parameters' shardings) plus each attention core, QK^T and AV: 4 x seq x the query width."""
        mats = sum(math.prod(p.sharding.full_shape) for p in self.parameters()
                   if p.sharding.kind != "replicated" and len(p.sharding.full_shape) == 2)
        cores = [a for a in (self.attn, self.cross_attn) if a is not None]
        return 2.0 * mats + sum(4.0 * seq * a.query_width for a in cores)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return sequence_shard_dropout(x, self.dropout, self.training, self.tp_group)
        return F.dropout(x, self.dropout, self.training)

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self._dropout(sublayer(norm(x)))
        return norm(x + self._dropout(sublayer(x)))

    def forward_args(self, *args: torch.Tensor) -> torch.Tensor | tuple:
        """``forward`` of the input given as separate tensors (x, or x and what it carries): what a checkpoint
        passes."""
        return self(args if len(args) > 1 else args[0])

    def forward(self, x: torch.Tensor | tuple, kv: KVSlot | None = None) -> torch.Tensor | tuple:
        """x (B, T, C), or this rank's (B, T/tp, C) sequence shard under sequence parallelism; or the tuple
        (x, *carried) (``carries``), returned as a tuple with the new x."""
        extras: tuple = ()
        if isinstance(x, (tuple, list)):
            x, extras = x[0], tuple(x[1:])
        got = dict(zip(self.carries, extras))
        segments, padding = got.get("segments"), got.get("padding")
        bias = got.get("position_bias")
        x = self._residual(x, self.norm1, lambda h: self.attn(h, kv, segments, padding, position_bias=bias))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, context=got["context"], context_padding=got.get("context_padding")))
        x = self._residual(x, self.norm2, self.mlp)
        return (x, *extras) if extras else x
