"""Hugging Face adapters: one module per HF ``model_type`` (``gpt2.py``, ``llama.py``, ...), each saying everything
mtnlg needs to export to and import from that type:

    MODEL_TYPE, HF_CLASS          "llama", "LlamaForCausalLM"
    config_class()                the transformers config class
    KEYMAP                        key map as data (``mtnlg.convert.keymaps``: native module -> HF module, op)
    misfit(cfg)                   None when the HF class represents the run config exactly, else the knob (a phrase)
    to_hf_config(cfg, common)     run config -> transformers config (``common``: vocab, dtype, token ids, ...)
    model_section(hf, refuse)     transformers config -> the run config's ``model:`` section (``refuse(what)`` for
                                  what mtnlg cannot represent)
    hf_name(name, have)           (optional) the name a checkpoint spells a weight with, or None
    rows(cfg, group)              (optional) a group's KEYMAP rows, where blocks differ (T5's encoder and decoder)
    ignored(name)                 (optional) whether a tensor of a directory maps to nothing (tied copies)
    verify_inputs(cfg), hf_outputs(model, inputs)  (optional) what ``export-hf --verify`` runs both models on and
                                  what the HF model returns for it, as mtnlg's model does (class: ``class_name(cfg)``
                                  or HF_CLASS; default: AutoModelForCausalLM's logits on token ids)
    training_kwargs(inputs, labels)  (optional) the HF class's keyword arguments for a training step on mtnlg's
                                  micro batch (``mtnlg bench``'s peer; default: a causal LM's ids and shifted labels)

A family lists the model types it maps to (``Family.hf_model_types``, preferred first); export picks the first that
represents a model exactly (its own architecture's first). Adding a type is a new module here and its name in the
family's list.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mtnlg import families
from mtnlg.config import ModelConfig
from mtnlg.errors import UserError


def adapter(model_type: str) -> ModuleType:
    """The adapter module of an HF model type (a KeyError for one no family lists)."""
    if model_type not in model_types():
        raise KeyError(model_type)
    return importlib.import_module(f"{__name__}.{model_type.replace('-', '_')}")  # megatron-bert: megatron_bert.py


def model_types() -> list[str]:
    """Every HF model type some registered family maps to, in registration order."""
    from mtnlg.model.registry import family

    out: list[str] = []
    for d in families.REGISTERED:
        for t in family(next(iter(d.architectures))).hf_model_types:
            if t not in out:
                out.append(t)
    return out


def adapter_for(cfg: ModelConfig) -> ModuleType:
    """The adapter whose HF class represents a resolved model config exactly: the one named like its architecture
    when it fits, else the family's first that does; a one-line ``UserError`` naming the knob when none does."""
    from mtnlg.model.registry import family

    types = list(family(cfg).hf_model_types)
    if cfg.architecture in types:
        types.remove(cfg.architecture)
        types.insert(0, cfg.architecture)
    first = adapter(types[0])
    for t in types:
        if adapter(t).misfit(cfg) is None:
            return adapter(t)
    raise UserError(f"{first.misfit(cfg)} has no Hugging Face equivalent (no transformers class represents this "
                    f"combination exactly); export refused: change the knob or keep the model in mtnlg's format")
