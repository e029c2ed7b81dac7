"""Key maps as data: mtnlg's parameter names, how their tensor-parallel shards merge, and the
Hugging Face names they map to.

A model is read and written one *group* at a time: ``embed``, ``layers.<i>``, ``final_norm``
and (untied models) ``head``. Inside a group a parameter has a *local* name (``attn.qkv.weight``);
its full name is the group's spec prefix plus the local name, exactly as DeepSpeed's
PipelineModule and GPTModel name it (``3.attn.qkv.weight``, ``tied_modules.embed.word_embeddings.weight``).

Every local name has one tensor-parallel rule (see ``tp_rule``), the same classification as
``mtnlg/training/universal.py``: replicated, row-parallel (dim 1), column-parallel (dim 0,
fused blocks split separately), vocabulary-parallel (dim 0, zero padding rows).

The HF maps list ``(hf name, native local name, op)``; an op says how the HF tensor is made
from the native one (and, inverted, how import makes the native one):

    COPY        same tensor
    T           transpose (GPT-2's Conv1D stores [in, out])
    ("part", i, "qkv" | "gate_up")   block i of a fused native tensor (dim 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtnlg.config import ModelConfig

COPY, T = "copy", "T"

# --------------------------------------------------------------------------- native names


@dataclass(frozen=True)
class Group:
    name: str  # "embed", "layers.3", "final_norm", "head"
    spec_index: int  # index in the layer-spec list (the pipeline layer file number)
    prefix: str  # full name = prefix + local name
    locals: tuple[str, ...]

    def full(self, local: str) -> str:
        return self.prefix + local


def groups(cfg: ModelConfig) -> list[Group]:
    """The parameter groups of a model, in forward order."""
    L = cfg.num_layers
    embed = ["word_embeddings.weight"] + (["position_embeddings.weight"] if cfg.position_embedding == "learned" else [])
    block = []
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc", "mlp.proj"):
        block.append(f"{part}.weight")
        if cfg.bias:
            block.append(f"{part}.bias")
    norm = ["norm.weight"] + (["norm.bias"] if cfg.bias else [])
    out = [Group("embed", 0, "tied_modules.embed." if cfg.tie_embeddings else "0.", tuple(embed))]
    out += [Group(f"layers.{i}", i + 1, f"{i + 1}.", tuple(block)) for i in range(L)]
    out.append(Group("final_norm", L + 1, f"{L + 1}.", tuple(norm)))
    if not cfg.tie_embeddings:
        out.append(Group("head", L + 2, f"{L + 2}.", ("head.weight",)))
    return out


def split_sizes(cfg: ModelConfig, key: str) -> list[int]:
    """The logical blocks of a fused tensor along dim 0."""
    if key == "qkv":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    if key == "gate_up":
        return [cfg.ffn_hidden_size, cfg.ffn_hidden_size]
    raise KeyError(key)


@dataclass(frozen=True)
class TPRule:
    kind: str  # "replicated" | "row" | "column" | "vocab"
    dim: int = 0
    sizes: tuple[int, ...] | None = None  # fused blocks split separately (column)


def tp_rule(local: str, cfg: ModelConfig) -> TPRule:
    """How the tensor-parallel shards of a parameter merge (and split)."""
    if local in ("word_embeddings.weight", "head.weight"):
        return TPRule("vocab", 0)
    if local.startswith("attn.qkv."):
        return TPRule("column", 0, tuple(split_sizes(cfg, "qkv")))
    if local.startswith("mlp.fc."):
        return TPRule("column", 0, tuple(split_sizes(cfg, "gate_up")) if cfg.activation == "swiglu" else None)
    if local in ("attn.proj.weight", "mlp.proj.weight"):
        return TPRule("row", 1)
    return TPRule("replicated")


def full_shape(local: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The merged (tp=1), unpadded shape of a parameter."""
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    fc_out = 2 * ffn if cfg.activation == "swiglu" else ffn
    shapes = {
        "word_embeddings.weight": (cfg.vocab_size, h),
        "head.weight": (cfg.vocab_size, h),
        "position_embeddings.weight": (cfg.max_position_embeddings, h),
        "attn.qkv.weight": (q + 2 * kv, h),
        "attn.qkv.bias": (q + 2 * kv,),
        "attn.proj.weight": (h, q),
        "mlp.fc.weight": (fc_out, h),
        "mlp.fc.bias": (fc_out,),
        "mlp.proj.weight": (h, ffn),
    }
    return shapes.get(local, (h,))  # norms and output biases


def local_shape(local: str, cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """The shape one tensor-parallel rank holds (vocabulary padded as ``cfg`` pads it for ``tp``)."""
    shape = list(full_shape(local, cfg))
    rule = tp_rule(local, cfg)
    if rule.kind == "vocab":
        shape[0] = cfg.padded_vocab_size // tp
    elif rule.kind != "replicated":
        shape[rule.dim] //= tp
    return tuple(shape)


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
