"""GPT2LMHeadModel <-> mtnlg's gpt2 architecture (learned positions, LayerNorm, tanh GELU, biases, tied head)."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.convert.keymaps import COPY, T, fixed_misfit

MODEL_TYPE, HF_CLASS = "gpt2", "GPT2LMHeadModel"
FIXED = {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned",
         "bias": True, "qkv_bias": True, "norm_position": "pre"}

KEYMAP = {
    "embed": [("transformer.wte", "word_embeddings", COPY), ("transformer.wpe", "position_embeddings", COPY)],
    "layer": [
        ("transformer.h.{}.ln_1", "norm1", COPY),
        ("transformer.h.{}.attn.c_attn", "attn.qkv", T),  # [q; k; v] rows = HF's columns (Conv1D stores [in, out])
        ("transformer.h.{}.attn.c_proj", "attn.proj", T),
        ("transformer.h.{}.ln_2", "norm2", COPY),
        ("transformer.h.{}.mlp.c_fc", "mlp.fc", T),
        ("transformer.h.{}.mlp.c_proj", "mlp.proj", T),
    ],
    "final_norm": [("transformer.ln_f", "norm", COPY)],
    "head": [("lm_head", "head", COPY)],
}


def config_class():
    from transformers import GPT2Config

    return GPT2Config


def misfit(cfg: ModelConfig) -> str | None:
    found = fixed_misfit(HF_CLASS, FIXED, cfg)
    if found is None and cfg.num_kv_heads != cfg.num_attention_heads:
        return f"model.num_kv_heads = {cfg.num_kv_heads} ({HF_CLASS} has one key/value head per query head)"
    return found


def to_hf_config(cfg: ModelConfig, common: dict):
    return config_class()(
        n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size, activation_function="gelu_new",
        resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.norm_eps, **common,
    )


def model_section(hf, refuse) -> dict:
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        refuse(f"activation_function {hf.activation_function!r} (mtnlg uses tanh GELU)")
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx or hf.add_cross_attention:
        refuse("non-standard attention (scale_attn_weights/scale_attn_by_inverse_layer_idx/cross attention)")
    return {
        "architecture": "gpt2", "num_layers": hf.n_layer, "hidden_size": hf.n_embd,
        "num_attention_heads": hf.n_head, "ffn_hidden_size": hf.n_inner or 4 * hf.n_embd,
        "seq_length": hf.n_positions, "max_position_embeddings": hf.n_positions, "vocab_size": hf.vocab_size,
        "norm_eps": hf.layer_norm_epsilon, "hidden_dropout": hf.resid_pdrop, "attention_dropout": hf.attn_pdrop,
        "init_std": hf.initializer_range, "tie_embeddings": bool(hf.tie_word_embeddings),
    }


def hf_name(name: str, have: set[str]) -> str | None:
    """GPT2Model-style checkpoints spell the weights without 'transformer.'."""
    if name in have:
        return name
    if name.startswith("transformer.") and name[len("transformer."):] in have:
        return name[len("transformer."):]
    return None
