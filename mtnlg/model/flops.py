"""Parameter counts and model FLOPs of a resolved config, read off the model's parameters (built on the meta
device: no memory).

FLOPs follow Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
Clusters"): every matmul of the forward pass (QKV, attention scores and values, output
projection, MLP, LM head) at 2 FLOPs per multiply-add, times 3 for forward + backward.
Recomputation is not counted (these are *model* FLOPs, the numerator of MFU). For a GPT with
ffn = 4h this is the paper's 72 * B * s * l * h^2 * (1 + s / 6h + V / 12lh).
"""

from __future__ import annotations

from mtnlg.config import ModelConfig, RunConfig
from mtnlg.model.layout import param_count, spec_flops

__all__ = ["describe", "flops_per_token", "param_count"]


def flops_per_token(m: ModelConfig, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token."""
    return 3.0 * sum(spec_flops(m, seq_length))


def describe(cfg: RunConfig) -> str:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    n = param_count(m)
    return (
        f"{m.architecture} model: {n / 1e6:.2f}M parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"heads {m.num_attention_heads} (kv {m.num_kv_heads}), ffn {m.ffn_hidden_size}, seq {m.seq_length}, "
        f"vocab {m.vocab_size} (padded {m.padded_vocab_size})\n"
        f"layout: tp={p.tensor} pp={p.pipeline} dp={p.data}; global batch {t.global_batch_size} = "
        f"micro {t.micro_batch_size} x accumulation {t.grad_accum_steps} x dp {p.data}\n"
        f"training FLOPs per token: {flops_per_token(m) / 1e9:.3f} GFLOP"
    )
