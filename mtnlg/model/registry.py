"""The model-family registry: what the trainer, checkpoints, converters, evaluation and the planner ask of a
model, without naming any family's classes.

    fam = family(cfg)                                  # cfg: a ModelConfig (or an architecture name)
    specs = fam.layer_specs(cfg, ps, rng, init)        # DeepSpeed LayerSpecs: the pipeline's model
    model = fam.model(cfg, ps, seed=..., rng=..., specs=None)   # the same specs in one module (pp = 1, a stage)
    loss_fn = fam.loss(cfg, ps)                        # loss_fn(outputs, labels) -> scalar
    inputs, labels = fam.micro_batch(samples)          # dataset samples -> what the model and loss take

A family is declared in ``mtnlg.families`` (its architectures, knob defaults and config checks, registered once)
and implemented by the module that declaration names, whose ``FAMILY`` is a ``Family`` below.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mtnlg import families
from mtnlg.config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    # (cfg, ps, rng, init) -> the model as a list of DeepSpeed LayerSpecs (resolved cfg)
    layer_specs: Callable[..., list]
    # the layer specs built into one module, parameters named as DeepSpeed's PipelineModule names them:
    # model(cfg, ps=None, seed=1234, rng=None, specs=None); ``specs=range(a, b)`` builds one pipeline stage
    model: Callable[..., torch.nn.Module]
    # (cfg, ps) -> loss_fn(outputs of the last spec, labels) -> scalar
    loss: Callable[..., Callable]
    # dataset samples (micro_batch, sample_length) int64 -> (inputs, labels) as the model and loss take them
    micro_batch: Callable[[torch.Tensor], tuple[Any, Any]]
    # full names of the weights two specs share (DeepSpeed keeps a copy on the last stage: ds_pipe_replicated)
    tied_weight_names: Callable[[ModelConfig], list[str]]
    # the modules of a built model whose weight is a token lookup (DeepSpeed's BF16 optimizer fp32 gradients)
    token_lookups: Callable[[torch.nn.Module], list]
    # Hugging Face model types it exports to and imports from (mtnlg.convert.hf.<model_type>), preferred first
    hf_model_types: tuple[str, ...]
    # activation-memory terms per micro batch (mtnlg.training.memory): an object with ``layer_activation_bytes``,
    # ``embedding_activation_bytes``, ``head_activation_bytes`` and ``loss_backward_bytes``
    memory: Any
    # whether it generates text left to right (perplexity, generation, the server)
    causal_lm: bool = True
    # a family's own training data: (resolved RunConfig) -> (train, valid) sources, ``source[i]`` being global
    # sample i in whatever form ``collate`` takes (BERT's sentence pairs, T5's span corruption); None: the GPT
    # token windows of mtnlg.training.sources (synthetic, indexed datasets, the default corpus)
    sources: Callable[..., tuple[Any, Any]] | None = None
    # (RunConfig) -> the tokenizer its data is read with (BERT's WordPiece); None: mtnlg.data.gpt_dataset's
    tokenizer: Callable[..., Any] | None = None
    # (list of samples of ``sources``) -> (inputs, labels), tensors or tuples of tensors; None: stack the samples
    # into one int64 tensor and call ``micro_batch``
    collate: Callable[[list], tuple[Any, Any]] | None = None
    # whether DeepSpeed's pipeline engine may split what a stage sends over the tp group (its default): it splits
    # the first tensor only and wants no gradient for the others; False sends every tensor whole (T5 carries the
    # encoder's output and a position bias, with gradients, beside the hidden states)
    pipe_partitioned: bool = True


def family(cfg_or_architecture: ModelConfig | str) -> Family:
    """The implementation of the family that owns a config's architecture (default gpt2)."""
    arch = cfg_or_architecture if isinstance(cfg_or_architecture, str) else cfg_or_architecture.architecture
    return _implementation(families.declaration(arch or "gpt2").implementation)


@functools.cache
def _implementation(module: str) -> Family:
    return importlib.import_module(module).FAMILY


def is_block(obj: Any) -> bool:
    """Whether a spec's module (or its bound forward) is a transformer block: the unit of full recompute, and what
    every pipeline stage holds at least one of. Block classes say so with ``is_block = True``."""
    return bool(getattr(getattr(obj, "__self__", obj), "is_block", False))
