"""Key maps as data: the Hugging Face names of mtnlg's parameters, and how each HF tensor is made. Each HF model
type's map is in its adapter (``mtnlg.convert.hf.<model_type>.KEYMAP``); this module applies them.

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
from mtnlg.model.layout import Group

COPY, T = "copy", "T"



def fixed_misfit(hf_class: str, fixed: dict[str, object], cfg: ModelConfig) -> str | None:
    """None when ``cfg`` has every knob value an HF class fixes, else the first it has not (one phrase)."""
    for knob, value in fixed.items():
        if getattr(cfg, knob) != value:
            return f"model.{knob} = {getattr(cfg, knob)} ({hf_class} has {value})"
    return None


def hf_class(cfg: ModelConfig) -> str:
    """The Hugging Face class that represents a resolved model config exactly; a one-line ``UserError`` naming the
    knob when none does (``mtnlg.convert.hf.adapter_for``)."""
    from mtnlg.convert.hf import adapter_for

    adapter = adapter_for(cfg)
    return adapter.class_name(cfg) if hasattr(adapter, "class_name") else adapter.HF_CLASS  # BERT: by its head


def hf_entries(cfg: ModelConfig, group: Group) -> list[tuple[str, str, object]]:
    """(hf name, native local name, op) for the parameters of ``group``, in map order."""
    from mtnlg.convert.hf import adapter_for

    adapter = adapter_for(cfg)
    table = adapter.KEYMAP
    if hasattr(adapter, "rows"):  # rows that differ between blocks (T5: encoder and decoder blocks)
        rows = adapter.rows(cfg, group.name)
    elif group.name.startswith("layers."):
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
