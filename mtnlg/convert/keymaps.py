"""Key maps as data: the Hugging Face names mtnlg's parameters map to, and how each HF tensor is made.

The native side (groups, local names, tensor-parallel rules) is ``mtnlg.model.layout``.

The HF maps list ``(hf name, native local name, op)``; an op says how the HF tensor is made
from the native one (and, inverted, how import makes the native one):

    COPY        same tensor
    T           transpose (GPT-2's Conv1D stores [in, out])
    ("part", i, "qkv" | "gate_up")   block i of a fused native tensor (dim 0)
"""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig
from mtnlg.model.layout import Group, full_shape, split_sizes

COPY, T = "copy", "T"

# --------------------------------------------------------------------------- Hugging Face maps

# gpt2 -> GPT2LMHeadModel
GPT2 = {
    "embed": [
        ("transformer.wte.weight", "word_embeddings.weight", COPY),
        ("transformer.wpe.weight", "position_embeddings.weight", COPY),
    ],
    "layer": [
        ("transformer.h.{}.ln_1.weight", "norm1.weight", COPY),
        ("transformer.h.{}.ln_1.bias", "norm1.bias", COPY),
        ("transformer.h.{}.attn.c_attn.weight", "attn.qkv.weight", T),  # [q; k; v] rows = HF's columns
        ("transformer.h.{}.attn.c_attn.bias", "attn.qkv.bias", COPY),
        ("transformer.h.{}.attn.c_proj.weight", "attn.proj.weight", T),
        ("transformer.h.{}.attn.c_proj.bias", "attn.proj.bias", COPY),
        ("transformer.h.{}.ln_2.weight", "norm2.weight", COPY),
        ("transformer.h.{}.ln_2.bias", "norm2.bias", COPY),
        ("transformer.h.{}.mlp.c_fc.weight", "mlp.fc.weight", T),
        ("transformer.h.{}.mlp.c_fc.bias", "mlp.fc.bias", COPY),
        ("transformer.h.{}.mlp.c_proj.weight", "mlp.proj.weight", T),
        ("transformer.h.{}.mlp.c_proj.bias", "mlp.proj.bias", COPY),
    ],
    "final_norm": [
        ("transformer.ln_f.weight", "norm.weight", COPY),
        ("transformer.ln_f.bias", "norm.bias", COPY),
    ],
    "head": [("lm_head.weight", "head.weight", COPY)],
}

# llama -> LlamaForCausalLM (mtnlg's RoPE is HF's rotate-half: q/k rows need no permutation)
LLAMA = {
    "embed": [("model.embed_tokens.weight", "word_embeddings.weight", COPY)],
    "layer": [
        ("model.layers.{}.input_layernorm.weight", "norm1.weight", COPY),
        ("model.layers.{}.self_attn.q_proj.weight", "attn.qkv.weight", ("part", 0, "qkv")),
        ("model.layers.{}.self_attn.k_proj.weight", "attn.qkv.weight", ("part", 1, "qkv")),
        ("model.layers.{}.self_attn.v_proj.weight", "attn.qkv.weight", ("part", 2, "qkv")),
        ("model.layers.{}.self_attn.o_proj.weight", "attn.proj.weight", COPY),
        ("model.layers.{}.post_attention_layernorm.weight", "norm2.weight", COPY),
        ("model.layers.{}.mlp.gate_proj.weight", "mlp.fc.weight", ("part", 0, "gate_up")),
        ("model.layers.{}.mlp.up_proj.weight", "mlp.fc.weight", ("part", 1, "gate_up")),
        ("model.layers.{}.mlp.down_proj.weight", "mlp.proj.weight", COPY),
    ],
    "final_norm": [("model.norm.weight", "norm.weight", COPY)],
    "head": [("lm_head.weight", "head.weight", COPY)],
}

FAMILIES = {"gpt2": GPT2, "llama": LLAMA}
HF_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def hf_entries(cfg: ModelConfig, group: Group) -> list[tuple[str, str, object]]:
    """(hf name, native local name, op) for the parameters of ``group``."""
    table = FAMILIES[cfg.preset]
    if group.name.startswith("layers."):
        i = group.name.split(".")[1]
        rows = [(hf.format(i), local, op) for hf, local, op in table["layer"]]
    else:
        rows = list(table[group.name])
    return [r for r in rows if r[1] in group.locals]


def to_hf(cfg: ModelConfig, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native full tensors of a group (by local name) -> HF tensors (by HF name), in map order."""
    out = {}
    for hf, local, op in hf_entries(cfg, group):
        x = tensors[local]
        if op == T:
            x = x.t()
        elif isinstance(op, tuple):
            _, i, key = op
            x = x.split(split_sizes(cfg, key), dim=0)[i]
        out[hf] = x.contiguous()
    return out


def from_hf(cfg: ModelConfig, group: Group, get) -> dict[str, torch.Tensor]:
    """HF tensors -> native full tensors of a group; ``get(hf_name, expected_shape)`` reads one."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    out = {}
    for hf, local, op in hf_entries(cfg, group):
        shape = full_shape(local, cfg)
        if op == T:
            out[local] = get(hf, (shape[1], shape[0])).t().contiguous()
        elif isinstance(op, tuple):
            _, i, key = op
            sizes = split_sizes(cfg, key)
            parts.setdefault(local, []).append((i, get(hf, (sizes[i], *shape[1:]))))
        else:
            out[local] = get(hf, shape)
    for local, pieces in parts.items():
        out[local] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=0)
    return {local: out[local] for local in group.locals}
