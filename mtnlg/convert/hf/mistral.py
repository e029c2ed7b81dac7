"""MistralForCausalLM <-> mtnlg's mistral architecture: Llama's weights and knobs, full causal attention (a sliding
window shorter than the context is refused), no biases."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.convert.hf.llama import KEYMAP, rope_config, rope_section  # noqa: F401  (KEYMAP: the same names)
from mtnlg.convert.keymaps import fixed_misfit

MODEL_TYPE, HF_CLASS = "mistral", "MistralForCausalLM"
FIXED = {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
         "bias": False, "qkv_bias": False, "norm_position": "pre"}


def config_class():
    from transformers import MistralConfig

    return MistralConfig


def misfit(cfg: ModelConfig) -> str | None:
    return fixed_misfit(HF_CLASS, FIXED, cfg)


def to_hf_config(cfg: ModelConfig, common: dict):
    return config_class()(head_dim=cfg.head_dim, sliding_window=None, **rope_config(cfg, common))


def model_section(hf, refuse) -> dict:
    section = rope_section(MODEL_TYPE, hf, refuse)
    if hf.sliding_window is not None and hf.sliding_window < hf.max_position_embeddings:
        refuse(f"sliding_window {hf.sliding_window} (mtnlg attends to the whole causal context)")
    return section
