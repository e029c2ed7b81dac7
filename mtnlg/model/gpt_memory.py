"""The GPT family's activation memory per micro batch, counted tensor by tensor the way autograd saves mtnlg's
GPT blocks (what ``mtnlg.training.memory`` adds up; measured with ``saved_tensors_hooks`` by ``mtnlg bench``).

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): per layer and micro
batch s*b*h*(34 + 5*a*s/h) bytes in 16-bit, /tp inside the tensor-parallel regions, /tp everywhere with sequence
parallelism, the 5*a*s/h term gone with selective recompute, only the block input kept with full recompute. Here
the count is of this implementation (GQA's narrower k and v, SwiGLU's gate and up, RoPE's rotated q and k, the
attention kernel in use), not of a generic one.
"""

from __future__ import annotations

from mtnlg.config import ModelConfig


def attention_kind(m: ModelConfig, precision: str, device: str = "cpu") -> str:
    """Which attention path mtnlg runs (``model/blocks.py``): "unfused" (bf16 on a CPU: scores and probabilities
    kept), "dropout" (attention dropout: torch's math path keeps the probabilities, the mask and the dropped
    probabilities) or "flash" (torch's fused kernel: output and log-sum-exp kept)."""
    if m.attention_dropout > 0:
        return "dropout"
    if device == "cpu" and precision == "bf16" and m.seq_length <= 1024:
        return "unfused"
    return "flash"


def layer_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str,
                           attention: str = "flash", device: str = "cpu") -> float:
    """Bytes one transformer block keeps for backward per micro batch on one rank (recompute ``m.recompute``),
    counted the way autograd saves mtnlg's tensors (measured with ``saved_tensors_hooks``: mtnlg bench)."""
    e = 4 if precision == "fp32" else 2
    s, b, h = m.seq_length, micro, m.hidden_size
    q = s * b * m.num_attention_heads * m.head_dim / tp  # elements of this rank's q (and of the attention output)
    kv = s * b * m.num_kv_heads * m.head_dim / tp
    f = s * b * m.ffn_hidden_size / tp
    sbh = s * b * h / (tp if sp else 1)  # a tensor of the replicated region (a sequence shard under SP)
    if m.recompute == "full":
        return e * sbh  # the block's input; everything else is recomputed in backward
    # a norm keeps its input (LayerNorm), or, as torch's CPU RMSNorm computes it, two fp32 copies; and its
    # per-token statistics in fp32 (LayerNorm: mean and 1/std; RMSNorm: 1/rms)
    norm = (8 if device == "cpu" else e) * sbh if m.norm == "rmsnorm" else e * sbh
    norm += norm_stats_bytes(m, s * b, tp, sp)
    dropout = e * sbh if m.hidden_dropout > 0 else 0  # F.dropout keeps its mask in the input's dtype
    stored = 2 * norm + 2 * e * sbh + 2 * dropout  # + the inputs of the QKV and MLP-in projections
    rope = m.position_embedding == "rope"
    if rope:  # the layer's cos and sin tables (T, hd), which rotating q and k keeps
        stored += 2 * e * s * m.head_dim
    qkv_storage = q + 2 * kv  # v (and without RoPE q and k) are views of the QKV output, which stays alive
    if m.recompute == "selective":
        stored += e * ((q + kv if rope else 0) + qkv_storage)  # only the core's inputs
    elif attention == "unfused":
        stored += e * (3 * q + b * (m.num_attention_heads / tp) * s * s)  # scaled q, k, v (contiguous), probs
    elif attention == "dropout":  # torch's math path; on a CPU it works in fp32 whatever the input dtype
        ea = 4 if device == "cpu" else e
        stored += ea * (3 * q + 3 * b * (m.num_attention_heads / tp) * s * s)  # q, k, v; probs, mask, dropped
    else:
        stored += e * ((q + kv if rope else 0) + qkv_storage + q) + 4 * b * (m.num_attention_heads / tp) * s
    stored += e * q  # the output projection's input
    stored += e * (4 * f if m.activation == "swiglu" else 2 * f)  # fc output ([gate; up]), activation output(s)
    return stored


def embedding_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str) -> float:
    """The first stage before the blocks: the embedding dropout's mask (in the activations' dtype)."""
    e = 4 if precision == "fp32" else 2
    return e * m.seq_length * micro * m.hidden_size / (tp if sp else 1) if m.hidden_dropout > 0 else 0.0


def head_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str, device: str = "cpu") -> float:
    """The last stage past the blocks: the final norm's input, the output layer's input, and the logits (B, T, V/tp)
    kept for the loss's backward."""
    e = 4 if precision == "fp32" else 2
    sbh = m.seq_length * micro * m.hidden_size / (tp if sp else 1)
    norm = (8 if device == "cpu" else e) * sbh if m.norm == "rmsnorm" else e * sbh
    norm += norm_stats_bytes(m, m.seq_length * micro, tp, sp)
    return norm + e * sbh + e * m.seq_length * micro * m.padded_vocab_size / tp


def norm_stats_bytes(m: ModelConfig, tokens: float, tp: int, sp: bool) -> float:
    """What one norm keeps per token besides its input: fp32 mean and 1/std (LayerNorm) or 1/rms (RMSNorm)."""
    return (8 if m.norm == "layernorm" else 4) * tokens / (tp if sp else 1)


def loss_backward_bytes(m: ModelConfig, micro: int, tp: int, precision: str, device: str = "cpu",
                        sp: bool = False) -> float:
    """The last stage's working set on top of what is saved, at its peak (the loss's backward): the gradient of the
    logits (B, T, V/tp) in their dtype and two fp32 chunks of rows (the chunk converted and its softmax; see
    ``mtnlg.parallel.cross_entropy``)."""
    from mtnlg.parallel.cross_entropy import CHUNK_ELEMENTS_CPU, CHUNK_ELEMENTS_DEVICE

    e = 4 if precision == "fp32" else 2
    logits = m.seq_length * micro * m.padded_vocab_size / tp
    chunk = min(logits, CHUNK_ELEMENTS_CPU if device == "cpu" else CHUNK_ELEMENTS_DEVICE)
    return e * logits + (4 if precision == "fp32" else 8) * chunk  # fp32 logits: the chunk is a view, not a copy
