"""Key maps as data: the Hugging Face names of mtnlg's parameters, and how each HF tensor is made.

A row maps a native module (``attn.qkv``) to an HF module (``model.layers.{}.self_attn.q_proj``);
every parameter the native module has (``weight``, and ``bias`` where the model has one) maps to
the HF module's parameter of the same name. So a knob that adds a parameter to a layer (a bias)
needs no new row. The native side (groups, local names, shardings) is ``mtnlg.model.layout``,
read off the model.

An op says how the HF tensor is made from the native one (and, inverted, how import makes the
native one):

    COPY          same tensor
    T             transpose a matrix (GPT-2's Conv1D stores [in, out]); vectors are copied
    ("part", i)   block i of a fused native tensor (dim 0), blocks as the parameter's sharding lists them
"""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig
from mtnlg.errors import UserError
from mtnlg.model.layout import Group

COPY, T = "copy", "T"

# --------------------------------------------------------------------------- Hugging Face maps

# gpt2 -> GPT2LMHeadModel
GPT2 = {
    "embed": [("transformer.wte", "word_embeddings", COPY), ("transformer.wpe", "position_embeddings", COPY)],
    "layer": [
        ("transformer.h.{}.ln_1", "norm1", COPY),
        ("transformer.h.{}.attn.c_attn", "attn.qkv", T),  # [q; k; v] rows = HF's columns
        ("transformer.h.{}.attn.c_proj", "attn.proj", T),
        ("transformer.h.{}.ln_2", "norm2", COPY),
        ("transformer.h.{}.mlp.c_fc", "mlp.fc", T),
        ("transformer.h.{}.mlp.c_proj", "mlp.proj", T),
    ],
    "final_norm": [("transformer.ln_f", "norm", COPY)],
    "head": [("lm_head", "head", COPY)],
}

# llama -> LlamaForCausalLM (mtnlg's RoPE is HF's rotate-half: q/k rows need no permutation); Mistral and Qwen2
# name their parameters the same way
LLAMA = {
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

# HF class -> (its model_type, the knob values it can represent, its key map). Export picks the class that
# represents a model exactly: the architecture's own (PREFERRED) when it fits, else the first that does.
HF_CLASSES: dict[str, tuple[str, dict[str, object], dict]] = {
    "GPT2LMHeadModel": ("gpt2", {"norm": "layernorm", "activation": "gelu", "position_embedding": "learned",
                                 "bias": True, "qkv_bias": True}, GPT2),
    "LlamaForCausalLM": ("llama", {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope"}, LLAMA),
    "Qwen2ForCausalLM": ("qwen2", {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
                                   "bias": False, "qkv_bias": True}, LLAMA),
    "MistralForCausalLM": ("mistral", {"norm": "rmsnorm", "activation": "swiglu", "position_embedding": "rope",
                                       "bias": False, "qkv_bias": False}, LLAMA),
}
PREFERRED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "mistral": "MistralForCausalLM"}
MODEL_TYPES = {model_type: cls for cls, (model_type, _, _) in HF_CLASSES.items()}


def _misfit(cls: str, cfg: ModelConfig) -> str | None:
    """None when HF class ``cls`` represents ``cfg`` exactly, else the first knob it cannot (one phrase)."""
    _, fixed, _ = HF_CLASSES[cls]
    for knob, value in fixed.items():
        if getattr(cfg, knob) != value:
            return f"model.{knob} = {getattr(cfg, knob)} ({cls} has {value})"
    if cls == "GPT2LMHeadModel" and cfg.num_kv_heads != cfg.num_attention_heads:
        return f"model.num_kv_heads = {cfg.num_kv_heads} ({cls} has one key/value head per query head)"
    if cls == "LlamaForCausalLM" and cfg.qkv_bias != cfg.bias:
        return f"model.qkv_bias = {cfg.qkv_bias} with model.bias = {cfg.bias} ({cls} biases q, k, v and o together)"
    return None


def hf_class(cfg: ModelConfig) -> str:
    """The Hugging Face class that represents a resolved model config exactly; a one-line ``UserError`` naming the
    knob when none does."""
    first = PREFERRED[cfg.architecture]
    for cls in [first, *[c for c in HF_CLASSES if c != first]]:
        if _misfit(cls, cfg) is None:
            return cls
    raise UserError(f"{_misfit(first, cfg)} has no Hugging Face equivalent (no transformers class represents this "
                    f"combination exactly); export refused: change the knob or keep the model in mtnlg's format")


def hf_entries(cfg: ModelConfig, group: Group) -> list[tuple[str, str, object]]:
    """(hf name, native local name, op) for the parameters of ``group``, in map order."""
    table = HF_CLASSES[hf_class(cfg)][2]
    if group.name.startswith("layers."):
        i = group.name.split(".")[1]
        rows = [(hf.format(i), native, op) for hf, native, op in table["layer"]]
    else:
        rows = list(table[group.name])
    out = []
    for hf, native, op in rows:
        for local in group.locals:
            module, _, param = local.rpartition(".")
            if module == native:
                out.append((f"{hf}.{param}", local, op))
    return out


def to_hf(cfg: ModelConfig, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native full tensors of a group (by local name) -> HF tensors (by HF name), in map order."""
    out = {}
    for hf, local, op in hf_entries(cfg, group):
        x = tensors[local]
        if op == T and x.dim() == 2:
            x = x.t()
        elif isinstance(op, tuple):
            x = x.split(list(group.sharding(local).blocks), dim=0)[op[1]]
        out[hf] = x.contiguous()
    return out


def from_hf(cfg: ModelConfig, group: Group, get) -> dict[str, torch.Tensor]:
    """HF tensors -> native full tensors of a group; ``get(hf_name, expected_shape)`` reads one."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    out = {}
    for hf, local, op in hf_entries(cfg, group):
        sharding = group.sharding(local)
        shape = sharding.full_shape
        if op == T and len(shape) == 2:
            out[local] = get(hf, (shape[1], shape[0])).t().contiguous()
        elif isinstance(op, tuple):
            size = sharding.blocks[op[1]]
            parts.setdefault(local, []).append((op[1], get(hf, (size, *shape[1:]))))
        else:
            out[local] = get(hf, shape)
    for local, pieces in parts.items():
        out[local] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=0)
    return {local: out[local] for local in group.locals}
