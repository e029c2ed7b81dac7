"""LlamaForCausalLM <-> mtnlg's llama architecture (RoPE, RMSNorm, SwiGLU, GQA, untied head). mtnlg's RoPE is HF's
rotate-half: q/k rows need no permutation. Mistral and Qwen2 name their parameters the same way (their adapters
reuse ``KEYMAP`` and ``rope_config``)."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.convert.keymaps import COPY, fixed_misfit

MODEL_TYPE, HF_CLASS = "llama", "LlamaForCausalLM"
FIXED = {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
         "norm_position": "pre"}

KEYMAP = {
    "embed": [("model.embed_tokens", "word_embeddings", COPY)],
    "layer": [
        ("model.layers.{}.input_layernorm", "norm1", COPY),
        ("model.layers.{}.self_attn.q_proj", "attn.qkv", ("part", 0)),
        ("model.layers.{}.self_attn.k_proj", "attn.qkv", ("part", 1)),
        ("model.layers.{}.self_attn.v_proj", "attn.qkv", ("part", 2)),
        ("model.layers.{}.self_attn.o_proj", "attn.proj", COPY),
        ("model.layers.{}.post_attention_layernorm", "norm2", COPY),
        ("model.layers.{}.mlp.gate_proj", "mlp.fc", ("part", 0)),
        ("model.layers.{}.mlp.up_proj", "mlp.fc", ("part", 1)),
        ("model.layers.{}.mlp.down_proj", "mlp.proj", COPY),
    ],
    "final_norm": [("model.norm", "norm", COPY)],
    "head": [("lm_head", "head", COPY)],
}


def config_class():
    from transformers import LlamaConfig

    return LlamaConfig


def misfit(cfg: ModelConfig) -> str | None:
    found = fixed_misfit(HF_CLASS, FIXED, cfg)
    if found is None and cfg.qkv_bias != cfg.bias:
        return (f"model.qkv_bias = {cfg.qkv_bias} with model.bias = {cfg.bias} "
                f"({HF_CLASS} biases q, k, v and o together)")
    return found


def rope_config(cfg: ModelConfig, common: dict) -> dict:
    """The keyword arguments Llama, Mistral and Qwen2 configs share."""
    return {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_dropout": cfg.attention_dropout,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, **common}


def to_hf_config(cfg: ModelConfig, common: dict):
    return config_class()(head_dim=cfg.head_dim, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                          **rope_config(cfg, common))


def rope_section(kind: str, hf, refuse) -> dict:
    """The ``model:`` section of a Llama-like config (Llama, Mistral, Qwen2), without its bias knobs."""
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        refuse(f"rope_parameters.rope_type {rope.get('rope_type')!r} (RoPE scaling)")
    if hf.hidden_act != "silu":
        refuse(f"hidden_act {hf.hidden_act!r}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        refuse(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    return {
        "architecture": kind, "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
        "num_attention_heads": hf.num_attention_heads, "num_kv_heads": hf.num_key_value_heads,
        "ffn_hidden_size": hf.intermediate_size, "seq_length": min(hf.max_position_embeddings, 4096),
        "max_position_embeddings": hf.max_position_embeddings, "vocab_size": hf.vocab_size,
        "rope_theta": float(rope.get("rope_theta", 10000.0)), "norm_eps": hf.rms_norm_eps,
        "attention_dropout": float(hf.attention_dropout or 0.0), "init_std": hf.initializer_range,
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }


def model_section(hf, refuse) -> dict:
    section = rope_section(MODEL_TYPE, hf, refuse)
    if hf.attention_bias != hf.mlp_bias:
        refuse("attention_bias != mlp_bias (mtnlg's model.bias covers both)")
    return {**section, "bias": bool(hf.attention_bias), "qkv_bias": bool(hf.attention_bias)}
