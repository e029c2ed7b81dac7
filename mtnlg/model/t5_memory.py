"""The T5 family's activation memory per micro batch (what ``mtnlg.training.memory`` adds up for ``model-info`` and
``plan``), counted tensor by tensor as autograd keeps mtnlg's T5 blocks (``mtnlg.model.t5``).

``block_activation_bytes`` is one block's: an encoder block (its sequence: ``seq_length``) or a decoder block
(``decoder_seq_length``, plus its cross-attention over the encoder's output); the memory model adds up the blocks a
stage holds. ``layer_activation_bytes`` is their mean weighted by their numbers (the figure per block a summary
shows). Checked against the measured peak of a tp 2 x pp 2 step (tests/test_bench.py). Under sequence parallelism
(``sp``) the tensors of the replicated region (the norms' inputs, dropout masks, the column-parallel projections'
inputs, the encoder output the cross-attention's keys and values read) are kept as sequence shards: 1/tp of them
(not yet checked against a measured peak).
"""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.families.t5 import decoder_length, depths


def attention_kind(m: ModelConfig, precision: str, device: str = "cpu") -> str:
    """"dropout" (attention dropout: torch's math path), "unfused" (a CPU: the additive position bias keeps torch
    off its flash kernel, the probabilities are kept) or "flash" (an accelerator's fused kernel with a bias)."""
    if m.attention_dropout > 0:
        return "dropout"
    return "unfused" if device == "cpu" else "flash"


def _attention_bytes(e: int, b: int, heads: float, q_tokens: int, k_tokens: int, hd: int, attention: str) -> float:
    """What one attention core keeps: q, k, v (views of their projections) and the probabilities or the kernel's
    output and log-sum-exp. T5's additive position bias makes torch pick its math path for a masked, biased
    softmax on a CPU: the probabilities are kept there."""
    qkv = e * b * heads * hd * (q_tokens + 2 * k_tokens)
    if attention == "flash":
        return qkv + e * b * heads * hd * q_tokens + 4 * b * heads * q_tokens
    return qkv + e * b * heads * q_tokens * k_tokens * (3 if attention == "dropout" else 1)


def _block_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str, attention: str, device: str,
                 tokens: int, decoder: bool, context: int) -> float:
    e = 4 if precision == "fp32" else 2
    b, h = micro, m.hidden_size
    shard = tp if sp else 1  # sequence parallelism: the replicated region's tensors are sequence shards
    sbh = tokens * b * h / shard
    if m.recompute == "full":
        return e * sbh
    heads, hd = m.num_attention_heads / tp, m.head_dim
    norm = (8 if device == "cpu" else e) * sbh + 4 * tokens * b / shard  # RMSNorm: its input (fp32 on a CPU), 1/rms
    dropout = e * sbh if m.hidden_dropout > 0 else 0
    f = tokens * b * m.ffn_hidden_size / tp
    gated = (m.family_knobs.feed_forward == "gated-gelu") if m.family_knobs else True
    subs = 3 if decoder else 2
    stored = subs * (norm + e * sbh + dropout)  # each sub-layer: its norm, the projection's input, its dropout
    core = _attention_bytes(e, b, heads, tokens, tokens, hd, attention)
    if decoder:
        core += _attention_bytes(e, b, heads, tokens, context, hd, attention) + e * context * b * h / shard  # kv input
    if m.recompute == "selective":
        core = e * b * heads * hd * 3 * tokens * (2 if decoder else 1)
    stored += core + e * tokens * b * heads * hd * (2 if decoder else 1)  # the output projections' inputs
    stored += e * (4 * f if gated else 2 * f)  # fc output ([gate; up]) and the activation's output(s)
    return stored


def layer_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str,
                           attention: str = "flash", device: str = "cpu") -> float:
    enc, dec = depths(m)
    s, t = m.seq_length, decoder_length(m)
    attention = attention_kind(m, precision, device) if attention == "flash" else attention
    e_bytes = _block_bytes(m, micro, tp, sp, precision, attention, device, s, False, s)
    d_bytes = _block_bytes(m, micro, tp, sp, precision, attention, device, t, True, s)
    return (enc * e_bytes + dec * d_bytes) / (enc + dec)


def block_activation_bytes(m: ModelConfig, index: int, micro: int, tp: int, sp: bool, precision: str,
                           attention: str = "flash", device: str = "cpu") -> float:
    """What block ``index`` (``layers.<index>``: the encoder's first, then the decoder's) keeps per micro batch."""
    enc, _ = depths(m)
    s, t = m.seq_length, decoder_length(m)
    attention = attention_kind(m, precision, device) if attention == "flash" else attention
    if index < enc:  # the encoder's last block with the encoder's final norm after it (on its stage)
        shard = tp if sp else 1
        norm = _norm_bytes(m, s * micro / shard, precision, device) if index == enc - 1 else 0.0
        return _block_bytes(m, micro, tp, sp, precision, attention, device, s, False, s) + norm
    return _block_bytes(m, micro, tp, sp, precision, attention, device, t, True, s)


def _norm_bytes(m: ModelConfig, tokens: float, precision: str, device: str) -> float:
    """What a stack's final RMSNorm keeps: its input (fp32 on a CPU) and 1/rms per token."""
    e = 4 if precision == "fp32" else 2
    return (8 if device == "cpu" else e) * tokens * m.hidden_size + 4 * tokens


def embedding_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str) -> float:
    e = 4 if precision == "fp32" else 2
    tokens = (m.seq_length + decoder_length(m)) / (tp if sp else 1)
    return e * tokens * micro * m.hidden_size if m.hidden_dropout > 0 else 0.0


def head_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str,
                          device: str = "cpu") -> float:
    """The decoder's final norm and output layer inputs and the logits (B, T_dec, V/tp) (the encoder's final norm is
    counted with the encoder's last block: ``block_activation_bytes``)."""
    e = 4 if precision == "fp32" else 2
    t = decoder_length(m)
    shard = tp if sp else 1  # the norm's input and the output layer's: sequence shards under SP
    return (_norm_bytes(m, t * micro / shard, precision, device) + e * t * micro * m.hidden_size / shard
            + e * t * micro * m.padded_vocab_size / tp)


def loss_backward_bytes(m: ModelConfig, micro: int, tp: int, precision: str, device: str = "cpu",
                        sp: bool = False) -> float:
    from mtnlg.parallel.cross_entropy import CHUNK_ELEMENTS_CPU, CHUNK_ELEMENTS_DEVICE

    e = 4 if precision == "fp32" else 2
    logits = decoder_length(m) * micro * m.padded_vocab_size / tp
    chunk = min(logits, CHUNK_ELEMENTS_CPU if device == "cpu" else CHUNK_ELEMENTS_DEVICE)
    return e * logits + (4 if precision == "fp32" else 8) * chunk
