"""One GPT definition for every layout: a list of DeepSpeed LayerSpecs.

    [embedding] + [TransformerBlock] * num_layers + [final norm] + [LM head]

For pp > 1 the list goes into DeepSpeed's ``PipelineModule`` (``mtnlg.training.pipeline``); for
pp = 1, ``GPTModel`` builds the same list in one module whose parameters have exactly the
names the PipelineModule gives them (``"<index>.<name>"``, tied ones under
``tied_modules.embed``), so checkpoints, converters and DeepSpeed's universal checkpoints
see one naming scheme whatever the layout.

Python API (one process, no launcher):

    model = GPTModel.from_config({"architecture": "llama", "num_layers": 2, "hidden_size": 64,
                                  "num_attention_heads": 4, "vocab_size": 1000, "seq_length": 128})
    model = model.to("cpu", torch.bfloat16)
    logits = model(input_ids)              # (B, T, vocab_size)
    loss = model(input_ids, labels=labels) # scalar
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from mtnlg.config import ModelConfig, RunConfig, from_dict, load_config, resolve
from mtnlg.model import gpt_memory
from mtnlg.model.blocks import TransformerBlock, make_norm
from mtnlg.model.documents import segment_positions, split_inputs
from mtnlg.model.kv_cache import KVSlot
from mtnlg.model.registry import Family, is_block
from mtnlg.model.stages import SpecModel
from mtnlg.parallel import Init, ParallelState, TPRandom, VocabParallelEmbedding, gather_from_tp, replicated
from mtnlg.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.parallel.layers import sequence_shard_dropout
from mtnlg.parallel.mappings import group_rank

TIED_KEY = "embed"
TIED_ATTR = "word_embeddings.weight"


class Embedding(nn.Module):
    """Token embeddings (vocab-parallel) plus learned positions (gpt2) and dropout. Under sequence parallelism the
    output is this rank's (B, T/tp, C) sequence shard."""

    group = "embed"  # its parameter group (checkpoints, converters)

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init, with_positions: bool = True):
        super().__init__()
        self.dropout = cfg.hidden_dropout
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.padded_vocab_size, cfg.hidden_size, tp_group=ps.tp_group, init=init, name="embed.word",
            sequence_parallel=ps.sequence_parallel,
        )
        self.position_embeddings = None
        if with_positions and cfg.position_embedding == "learned":
            shape = (cfg.max_position_embeddings, cfg.hidden_size)  # its values given at construction (ZeRO-3
            self.position_embeddings = replicated(  # partitions each parameter as soon as its module exists)
                nn.Embedding(*shape, _weight=init.normal("embed.position", shape)))

    def forward_flops(self, seq: int) -> float:
        """Forward FLOPs per token (lookups: none)."""
        return 0.0

    def head_flops(self) -> float:
        """Forward FLOPs per token of the tied output layer that reuses this embedding: one [V, h] matrix."""
        return 2.0 * math.prod(self.word_embeddings.weight.sharding.full_shape)

    def forward(self, input_ids: torch.Tensor | tuple, positions: torch.Tensor | None = None
                ) -> torch.Tensor | tuple:
        """input_ids (B, T) -> (B, T, C), or (B, T/tp, C) under sequence parallelism; (input_ids, segment_ids) ->
        (x, segment_ids) for packed documents (positions restart at each). ``positions`` (B, T): each token's
        position (incremental decoding)."""
        input_ids, segments = split_inputs(input_ids)
        x = self.word_embeddings(input_ids)  # (B, T, C) or (B, T/tp, C)
        if segments is not None:
            positions = segment_positions(segments)
        if self.position_embeddings is not None:
            pos = torch.arange(input_ids.size(1), device=input_ids.device)
            if positions is not None:
                pos = positions  # (B, T)
            if self.sequence_parallel:  # this rank's positions
                pos = pos.narrow(-1, group_rank(self.tp_group) * x.size(1), x.size(1))
            x = x + self.position_embeddings(pos)
        if self.sequence_parallel:
            x = sequence_shard_dropout(x, self.dropout, self.training, self.tp_group)
        else:
            x = F.dropout(x, self.dropout, self.training)
        return x if segments is None else (x, segments)


def tied_lm_head(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer of a tied model: logits from the input embedding matrix."""
    return embedding.word_embeddings(hidden, logits=True)  # (B, T, V_padded / tp)


class LMHead(nn.Module):
    """Untied output layer: this rank's slice of the padded-vocabulary logits."""

    group = "head"

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init):
        super().__init__()
        self.head = VocabParallelEmbedding(
            cfg.vocab_size, cfg.padded_vocab_size, cfg.hidden_size, tp_group=ps.tp_group, init=init, name="head",
            sequence_parallel=ps.sequence_parallel,
        )

    def forward_flops(self, seq: int) -> float:
        return 2.0 * math.prod(self.head.weight.sharding.full_shape)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, logits=True)  # (B, T, V_padded / tp)


class FinalNorm(nn.Module):
    group = "final_norm"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)

    def forward_flops(self, seq: int) -> float:
        return 0.0  # model FLOPs count matrix products only (Narayanan et al. 2021)

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        return self.norm(split_inputs(x)[0])  # packed documents: the segment ids end here


class GPTLoss:
    """Mean next-token loss over tokens whose label is not ``ignore_index``.

    Labels may be a pair ``(labels, weights)`` (fine-tuning, ``mtnlg.data.sft``): the loss is then
    ``sum(per-token loss x weight)`` over the tokens of non-zero weight; the labels of the others are never read.
    The weights carry the loss mask and the normalisation over the whole global batch."""

    def __init__(self, tp_group, vocab_size: int, ignore_index: int = -100):
        self.tp_group, self.vocab_size, self.ignore_index = tp_group, vocab_size, ignore_index

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor | tuple) -> torch.Tensor:
        if isinstance(labels, (tuple, list)):
            labels, weights = labels
            labels = labels.masked_fill(weights == 0, self.ignore_index)
            per_token = vocab_parallel_cross_entropy(logits, labels, self.tp_group, self.vocab_size,
                                                     self.ignore_index)
            return (per_token.float() * weights).sum()
        per_token = vocab_parallel_cross_entropy(logits, labels, self.tp_group, self.vocab_size, self.ignore_index)
        count = (labels != self.ignore_index).sum().clamp(min=1)
        return per_token.sum() / count


def layer_specs(cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init) -> list[LayerSpec]:
    """The model as a list of LayerSpecs (cfg must be resolved)."""
    if cfg.tie_embeddings:
        first = TiedLayerSpec(TIED_KEY, Embedding, cfg, ps, init, tied_weight_attr=TIED_ATTR)
        last = TiedLayerSpec(
            TIED_KEY, Embedding, cfg, ps, init, with_positions=False, forward_fn=tied_lm_head,
            tied_weight_attr=TIED_ATTR,
        )
    else:
        first, last = LayerSpec(Embedding, cfg, ps, init), LayerSpec(LMHead, cfg, ps, init)
    blocks = [LayerSpec(TransformerBlock, cfg, ps, rng, init, i) for i in range(cfg.num_layers)]
    return [first, *blocks, LayerSpec(FinalNorm, cfg), last]


def gpt_loss(cfg: ModelConfig, ps: ParallelState) -> GPTLoss:
    return GPTLoss(ps.tp_group, cfg.vocab_size)


def tied_weight_names(cfg: ModelConfig) -> list[str]:
    """Full names of the weights shared by two specs (the tied embedding), which DeepSpeed's pipeline engine keeps a
    copy of on the last stage (``ds_pipe_replicated``)."""
    return [f"tied_modules.{TIED_KEY}.{TIED_ATTR}"] if cfg.tie_embeddings else []


class GPTModel(SpecModel):
    """The layer specs built into one module, named as DeepSpeed's PipelineModule names them (``SpecModel``: the
    whole model with ``specs=None``; ``specs=range(a, b)`` one stage, whose forward takes the previous stage's
    hidden states, or token ids on the first stage)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState | None = None, seed: int = 1234,
                 rng: TPRandom | None = None, specs: range | None = None):
        super().__init__(cfg, ps, seed, rng, specs, layer_specs, gpt_loss)

    @classmethod
    def from_config(cls, config: dict[str, Any] | str | Path | ModelConfig | RunConfig, seed: int = 1234,
                    **overrides: Any) -> GPTModel:
        """Build a single-process model from a model dict, a YAML run config, or a config object."""
        if isinstance(config, (str, Path)):
            config = load_config(config)
        if isinstance(config, dict):
            config, overrides = from_dict({"model": {**config, **overrides}}), {}
        if isinstance(config, ModelConfig):
            config = RunConfig(model=config)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, **overrides),
                                     parallel=dataclasses.replace(config.parallel, tensor=1, pipeline=1, data=None))
        return cls(resolve(config, world_size=1).model, seed=seed)

    def forward(self, input_ids: torch.Tensor | tuple, labels: torch.Tensor | tuple | None = None) -> torch.Tensor:
        """Loss (scalar) when ``labels`` is given, else full-vocabulary logits (B, T, vocab_size). ``input_ids`` may
        be ``(input_ids, segment_ids)`` (packed documents) and ``labels`` ``(labels, weights)`` (see GPTLoss)."""
        logits = self.hidden_and_logits(input_ids)
        if labels is not None:
            return self.loss_fn(logits, labels)
        return gather_from_tp(logits, self.ps.tp_group)[..., : self.cfg.vocab_size]

    def new_cache(self, batch: int, max_len: int) -> list[KVSlot]:
        """An empty key/value cache for ``batch`` rows of up to ``max_len`` positions (this rank's heads)."""
        p = next(self.parameters())
        n_kv = self.cfg.num_kv_heads // self.ps.tp_size
        return [KVSlot(batch, n_kv, max_len, self.cfg.head_dim, p.device, p.dtype) for _ in range(self.cfg.num_layers)]

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, cache: list[KVSlot], rows: slice = slice(None),
                       segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) of new tokens ``input_ids`` for cache rows ``rows``, each row continuing
        at its cached length; the cache grows by T positions per row. ``segment_ids`` (B, T): packed documents,
        each attending only to itself (default: every new token continues its row's last document)."""
        cache[0].rows = rows
        positions = cache[0].plan(segment_ids, input_ids.size(1))
        for slot in cache[1:]:
            slot.follow(cache[0])
        x = None
        for f in self._funcs:
            if x is None:
                x = f(input_ids, positions)  # the embedding (first spec)
            elif is_block(f):
                x = f(x, cache[f.layer_number])
            else:
                x = f(x)
        for slot in cache:
            slot.start[rows] += input_ids.size(1)
        return gather_from_tp(x, self.ps.tp_group)[..., : self.cfg.vocab_size]


def next_token_batch(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of seq_length + 1 tokens -> (input ids, labels): each token predicts the next."""
    return samples[:, :-1], samples[:, 1:]


def token_lookups(module: nn.Module) -> list[nn.Module]:
    return [m.word_embeddings for m in module.modules() if isinstance(m, Embedding)]


FAMILY = Family(
    name="gpt",
    layer_specs=layer_specs,
    model=GPTModel,
    loss=gpt_loss,
    micro_batch=next_token_batch,
    tied_weight_names=tied_weight_names,
    token_lookups=token_lookups,
    hf_model_types=("gpt2", "llama", "qwen2", "mistral"),
    memory=gpt_memory,
)
