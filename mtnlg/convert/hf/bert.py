"""BertForPreTraining <-> mtnlg's bert architecture: post-LN blocks (``attention.output.LayerNorm`` after the
attention's residual sum, ``output.LayerNorm`` after the MLP's), an embedding LayerNorm, no final norm; the pooler and
the pretraining heads as MegatronBert's (``megatron_bert.py``)."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.convert.hf.megatron_bert import (  # noqa: F401  (the verify hooks are this adapter's too)
    EMBED,
    HEADS,
    MLP,
    QKV,
    TIED_COPIES,
    bert_config,
    bert_misfit,
    bert_section,
    hf_class_name,
    hf_outputs,
    verify_inputs,
)
from mtnlg.convert.keymaps import COPY

MODEL_TYPE, HF_CLASS = "bert", "BertForPreTraining"
FIXED = {"norm": "layernorm", "position_embedding": "learned", "bias": True, "qkv_bias": True,
         "tie_embeddings": True, "norm_position": "post"}

KEYMAP = {
    "embed": [*EMBED, ("bert.embeddings.LayerNorm", "norm", COPY)],
    "layer": [*QKV, ("bert.encoder.layer.{}.attention.output.LayerNorm", "norm1", COPY), *MLP,
              ("bert.encoder.layer.{}.output.LayerNorm", "norm2", COPY)],
    **HEADS,
}


def config_class():
    from transformers import BertConfig

    return BertConfig


def misfit(cfg: ModelConfig) -> str | None:
    return bert_misfit(HF_CLASS, FIXED, cfg)


def to_hf_config(cfg: ModelConfig, common: dict):
    return config_class()(**bert_config(cfg, common, "Bert"))


def model_section(hf, refuse) -> dict:
    return bert_section("bert", hf, refuse, "Bert")


def class_name(cfg: ModelConfig) -> str:
    return hf_class_name(cfg, "Bert")
