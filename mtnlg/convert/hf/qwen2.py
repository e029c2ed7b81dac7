"""Qwen2ForCausalLM <-> mtnlg's qwen2 architecture: Llama's weights with biases on q, k and v only, full attention
in every layer (a sliding window is refused)."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.convert.hf.llama import KEYMAP, rope_config, rope_section  # noqa: F401  (KEYMAP: the same names)
from mtnlg.convert.keymaps import fixed_misfit

MODEL_TYPE, HF_CLASS = "qwen2", "Qwen2ForCausalLM"
FIXED = {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
         "bias": False, "qkv_bias": True, "norm_position": "pre"}


def config_class():
    from transformers import Qwen2Config

    return Qwen2Config


def misfit(cfg: ModelConfig) -> str | None:
    return fixed_misfit(HF_CLASS, FIXED, cfg)


def to_hf_config(cfg: ModelConfig, common: dict):
    return config_class()(use_sliding_window=False, **rope_config(cfg, common))


def model_section(hf, refuse) -> dict:
    section = rope_section(MODEL_TYPE, hf, refuse)
    if hf.use_sliding_window:
        refuse("use_sliding_window (mtnlg attends to the whole causal context)")
    return section
