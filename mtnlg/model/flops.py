"""Parameter counts and model FLOPs of a resolved config (no model is built).

FLOPs follow Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
Clusters"): every matmul of the forward pass (QKV, attention scores and values, output
projection, MLP, LM head) at 2 FLOPs per multiply-add, times 3 for forward + backward.
Recomputation is not counted (these are *model* FLOPs, the numerator of MFU). For a GPT with
ffn = 4h this is the paper's 72 * B * s * l * h^2 * (1 + s / 6h + V / 12lh).
"""

from __future__ import annotations

from mtnlg.config import ModelConfig, RunConfig


def param_count(m: ModelConfig) -> int:
    h, ffn, V = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_kv_heads * m.head_dim
    norm = 2 * h if m.norm == "layernorm" else h
    mlp_in = 2 * ffn if m.activation == "swiglu" else ffn
    per_layer = 2 * norm + h * (q + 2 * kv) + q * h + h * mlp_in + ffn * h
    if m.bias:
        per_layer += (q + 2 * kv) + h + mlp_in + h
    total = V * h + m.num_layers * per_layer + norm
    if m.position_embedding == "learned":
        total += m.max_position_embeddings * h
    if not m.tie_embeddings:
        total += V * h
    return total


def flops_per_token(m: ModelConfig, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token."""
    s = seq_length or m.seq_length
    h, ffn = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_kv_heads * m.head_dim
    mlp_mats = 3 if m.activation == "swiglu" else 2
    per_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * mlp_mats * h * ffn + 4 * s * q
    forward = m.num_layers * per_layer + 2 * h * m.vocab_size
    return 3.0 * forward


def describe(cfg: RunConfig) -> str:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    n = param_count(m)
    return (
        f"{m.preset} model: {n / 1e6:.2f}M parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"heads {m.num_attention_heads} (kv {m.num_kv_heads}), ffn {m.ffn_hidden_size}, seq {m.seq_length}, "
        f"vocab {m.vocab_size} (padded {m.padded_vocab_size})\n"
        f"layout: tp={p.tensor} pp={p.pipeline} dp={p.data}; global batch {t.global_batch_size} = "
        f"micro {t.micro_batch_size} x accumulation {t.grad_accum_steps} x dp {p.data}\n"
        f"training FLOPs per token: {flops_per_token(m) / 1e9:.3f} GFLOP"
    )
