"""How a model's parameters are placed and sharded, read off the model itself.

A model is read and written one *group* at a time, one per layer spec that holds parameters:
``embed``, ``layers.<i>``, ``final_norm`` and (untied models) ``head``. Inside a group a
parameter has a *local* name (``attn.qkv.weight``); its full name is the group's prefix plus
the local name, exactly as DeepSpeed's PipelineModule and the family's pipeline-free model name it
(``3.attn.qkv.weight``, ``tied_modules.embed.word_embeddings.weight``).

Nothing here is a table: ``groups(cfg)`` builds the model on the meta device (no memory, no
init) and returns each group's parameters with the ``Sharding`` the layer that made them set
(``mtnlg.parallel.layers``): replicated, column (dim 0, fused blocks split separately), row
(dim 1) or vocabulary-parallel (dim 0, zero padding rows). Checkpoint readers and writers,
converters, universal-checkpoint metadata and parameter counts all use it, so a new kind of
parameter is declared once, where it is created.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from mtnlg.config import ModelConfig
from mtnlg.model.registry import family, is_block
from mtnlg.parallel import ParallelState, Sharding
from mtnlg.parallel.pipeline import balanced_parts


@dataclass(frozen=True)
class Group:
    name: str  # "embed", "layers.3", "final_norm", "head"
    spec_index: int  # index in the layer-spec list (the pipeline layer file number)
    prefix: str  # full name = prefix + local name
    params: tuple[tuple[str, Sharding], ...]  # (local name, sharding), in the module's parameter order

    @property
    def locals(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.params)

    def full(self, local: str) -> str:
        return self.prefix + local

    def sharding(self, local: str) -> Sharding:
        return dict(self.params)[local]


def groups(cfg: ModelConfig) -> list[Group]:
    """The parameter groups of a (resolved) model config, in forward order."""
    return list(_groups(_key(cfg)))


# fields that change no parameter's shape or sharding: configs differing only in them share one meta model
_SHAPELESS = {"recompute": "none", "activation_checkpointing": None, "hidden_dropout": 0.0, "attention_dropout": 0.0}


def _key(cfg: ModelConfig) -> tuple:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}  # flat: no nested dataclasses
    return tuple(sorted({**fields, **_SHAPELESS}.items()))


@functools.lru_cache(maxsize=32)
def _meta_model(key: tuple) -> torch.nn.Module:
    """The whole model at tp = 1 on the meta device: shapes and shardings, no memory, no initialisation."""
    cfg = ModelConfig(**dict(key))
    with torch.device("meta"):
        return family(cfg).model(cfg, ParallelState.single())


@functools.lru_cache(maxsize=32)
def _groups(key: tuple) -> tuple[Group, ...]:
    return tuple(Group(module.group, idx, prefix, tuple((n, p.sharding) for n, p in module.named_parameters()))
                 for idx, prefix, module in _meta_model(key).owners)


def sharding(local: str, cfg: ModelConfig) -> Sharding:
    """The sharding of the parameter with local name ``local`` (the same in every group that has it)."""
    found = {g.sharding(local) for g in groups(cfg) if local in g.locals}
    if len(found) != 1:
        raise KeyError(f"{local}: {len(found)} different shardings in the model")
    return found.pop()


def full_shape(local: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The merged (tp=1), unpadded shape of a parameter."""
    return sharding(local, cfg).full_shape


def local_shape(local: str, cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """The shape one tensor-parallel rank holds (vocabulary padded as ``cfg`` pads it for ``tp``)."""
    return sharding(local, cfg).local_shape(tp, cfg.padded_vocab_size)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the model (tied ones once, vocabulary unpadded)."""
    return sum(math.prod(s.full_shape) for g in groups(cfg) for _, s in g.params)


# --------------------------------------------------------------------------- pipeline stages


def spec_flops(cfg: ModelConfig, seq: int | None = None) -> list[float]:
    """Forward FLOPs per token of every layer spec at sequence length ``seq`` (default ``cfg.seq_length``),
    read off each spec's parameters: what a pipeline stage's time is proportional to. (The output layer of a
    GPT costs 2 * h * V per token, several transformer blocks' worth: GPT-2 small's is 4.9 blocks.)"""
    return list(_spec_flops(_key(cfg), seq or cfg.seq_length))


@functools.lru_cache(maxsize=256)
def _spec_flops(key: tuple, seq: int) -> tuple[float, ...]:
    return tuple(_meta_model(key).spec_flops(seq))


def block_anchors(cfg: ModelConfig) -> list[bool]:
    """Which specs are transformer blocks: every pipeline stage holds at least one."""
    return [is_block(f) for f in _meta_model(_key(cfg)).spec_modules()]


def stage_bounds(cfg: ModelConfig, pp_size: int) -> list[int]:
    """The ``pp_size + 1`` spec-index boundaries of the pipeline stages: contiguous, balanced by forward FLOPs."""
    return list(_stage_bounds(_key(cfg), pp_size))


@functools.lru_cache(maxsize=256)
def _stage_bounds(key: tuple, pp_size: int) -> tuple[int, ...]:
    model = _meta_model(key)  # the balance is a dynamic program over every spec: worth keeping (mtnlg plan asks often)
    anchors = [is_block(f) for f in model.spec_modules()]
    flops = list(_spec_flops(key, model.cfg.seq_length))
    own = getattr(model, "pipeline_bounds", None)  # a family's own split (T5: encoder stages, decoder stages)
    bounds = own(pp_size, flops) if own is not None else None
    return tuple(bounds if bounds is not None else balanced_parts(flops, pp_size, anchors))


def stage_specs(cfg: ModelConfig, pp_size: int, pp_rank: int) -> range:
    """The spec indices pipeline stage ``pp_rank`` of ``pp_size`` holds."""
    parts = stage_bounds(cfg, pp_size)
    return range(parts[pp_rank], parts[pp_rank + 1])


def tied_users(cfg: ModelConfig) -> dict[str, frozenset[int]]:
    """The spec indices that run each tied module (its prefix ``tied_modules.<key>.`` -> indices): DeepSpeed builds
    a copy of a tied module on every stage holding one of them (a GPT's tied output layer on the last stage; a T5 v1.1
    has none there, its output layer being its own)."""
    return dict(_tied_users(_key(cfg)))


@functools.lru_cache(maxsize=32)
def _tied_users(key: tuple) -> tuple[tuple[str, frozenset[int]], ...]:
    model = _meta_model(key)
    funcs = model.spec_modules()
    return tuple((prefix, frozenset(i for i, f in enumerate(funcs)
                                    if f is module or getattr(f, "args", (None,))[:1] == (module,)))
                 for _, prefix, module in model.owners if prefix.startswith("tied_modules."))


def saved_layers(cfg: ModelConfig, pp_size: int, pp_rank: int) -> list[int]:
    """The spec indices of pipeline stage ``pp_rank`` that DeepSpeed saves a layer file for: the specs of the stage
    that own parameters (not a tied output layer, which reuses the embedding's)."""
    owners = {idx for idx, _, _ in _meta_model(_key(cfg)).owners}
    return [i for i in stage_specs(cfg, pp_size, pp_rank) if i in owners]
