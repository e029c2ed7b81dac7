"""One BERT definition for every layout: a list of DeepSpeed LayerSpecs.

    [embedding] + [TransformerBlock(bidirectional)] * num_layers + [final norm (megatron_bert)]
        + [head: pooler, MLM transform] + [tied MLM decoder] + [output: vocabulary bias, binary head]

Inputs are ``(tokens, types, padding)`` (B, T) each (``padding``: 1 = real token); labels are ``(labels,
loss_mask, is_random)``: the original token at predicted positions, where they are (1), and the sentence-order
label (B,). What travels through the blocks (and DeepSpeed's pipeline) is ``(hidden, padding)``.

Pretraining batches (``collate``) add a fourth input, ``predicted`` (B, T): the loss mask. It travels with the
hidden states, and the MLM transform and decoder run on those rows only (~15% of the tokens: the decoder, a
[V, h] matrix per token, is most of a small BERT's work); the loss is the same, computed over the same logits.
Without it (or under sequence parallelism, where the rows are split across ranks) every token gets logits.

The MLM decoder reuses the word embeddings (a ``TiedLayerSpec``, as the GPT's tied head); the vocabulary bias
lives in the last spec, not in the tied module: DeepSpeed saves and synchronises only the first stage's copy of a
tied module and only its tied weight. ``BertModel`` builds the same specs in one module (pp = 1) with the names
DeepSpeed's ``PipelineModule`` gives them.

    model = BertModel(resolved_model_cfg)
    mlm_logits, sop_logits = model((tokens, types, padding))   # (B, T, vocab), (B, 2)
    loss = model((tokens, types, padding), (labels, loss_mask, is_random))   # MLM mean + SOP
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.model import bert_memory
from mtnlg.model.blocks import TransformerBlock, make_norm
from mtnlg.model.registry import Family
from mtnlg.model.stages import SpecModel
from mtnlg.parallel import Init, ParallelState, Sharding, TPRandom, VocabParallelEmbedding, gather_from_tp, replicated
from mtnlg.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.parallel.layers import sequence_shard_dropout, set_sharding
from mtnlg.parallel.mappings import group_rank, scatter_to_tp

TIED_KEY = "embed"
TIED_ATTR = "word_embeddings.weight"
IGNORE = -100


def from_first_tp_rank(x: torch.Tensor, group) -> torch.Tensor:
    """Tp rank 0's ``x`` (B, k) on every tp rank, its gradient back to rank 0 only. Under sequence parallelism the
    first token lives on rank 0: the pooler and the heads after it run on every rank's own first token (so their
    weights get partial gradients, summed over tp like every replicated weight applied to sequence shards) and
    rank 0's result is kept."""
    return gather_from_tp(x.unsqueeze(-1), group)[..., 0]


def gather_sequence_once(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/tp, k) sequence shards -> (B, T, k) on every tp rank, each rank's gradient back to its own shard (the
    loss after it is the same on every rank and counted once)."""
    return gather_from_tp(x.transpose(1, 2), group).transpose(1, 2)


def predicted_share(cfg: ModelConfig, ps: ParallelState) -> float:
    """The share of a pretraining batch's tokens the MLM head runs on (FLOPs; ``predicted``): ``mask_prob`` of them,
    all under sequence parallelism."""
    return 1.0 if ps.sequence_parallel else cfg.family_knobs.mask_prob


class Dense(nn.Module):
    """A replicated Linear (the pooler, the MLM transform, the binary head: small, the same on every tp rank) whose
    weight is drawn by name (layout-independent) when the module is made (ZeRO-3 partitions it right then)."""

    def __init__(self, init: Init, name: str, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(init.normal(f"{name}.weight", (out_features, in_features)))
        self.bias = nn.Parameter(torch.zeros(out_features))
        replicated(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BertEmbedding(nn.Module):
    """Word (vocab-parallel) + learned position + token-type embeddings, then (``bert``) a LayerNorm, then dropout.
    ``output_only``: the copy the last pipeline stage builds for the tied MLM decoder (the word embeddings alone)."""

    group = "embed"

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init, output_only: bool = False):
        super().__init__()
        self.dropout = cfg.hidden_dropout
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.predicted_share = predicted_share(cfg, ps)
        self.word_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.padded_vocab_size, cfg.hidden_size, tp_group=ps.tp_group, init=init, name="embed.word",
            sequence_parallel=ps.sequence_parallel)
        self.position_embeddings = self.tokentype_embeddings = self.norm = None
        if output_only:
            return
        shape = (cfg.max_position_embeddings, cfg.hidden_size)
        self.position_embeddings = replicated(nn.Embedding(*shape, _weight=init.normal("embed.position", shape)))
        types = cfg.family_knobs.num_tokentypes
        if types:
            shape = (types, cfg.hidden_size)
            self.tokentype_embeddings = replicated(nn.Embedding(*shape, _weight=init.normal("embed.tokentype", shape)))
        if cfg.norm_position == "post":  # the original BERT normalises the embeddings; Megatron's does not
            self.norm = make_norm(cfg)

    def forward_flops(self, seq: int) -> float:
        return 0.0

    def head_flops(self) -> float:
        """Forward FLOPs per token of the tied MLM decoder: one [V, h] matrix for each predicted token."""
        return 2.0 * math.prod(self.word_embeddings.weight.sharding.full_shape) * self.predicted_share

    def forward(self, inputs: tuple) -> tuple:
        """(tokens, types, padding[, predicted]) (B, T) each -> (x (B, T, C), padding[, predicted]); multiple
        choice: (B, C, T) each, run as B * C rows. ``predicted`` (pretraining) is dropped under sequence
        parallelism: the head then runs on every token."""
        tokens, types, padding = (t.flatten(0, 1) if t.dim() == 3 else t for t in inputs[:3])
        carried = (padding,) if len(inputs) < 4 or self.sequence_parallel else (padding, inputs[3])
        x = self.word_embeddings(tokens)  # (B, T, C), or this rank's (B, T/tp, C) under sequence parallelism
        pos = torch.arange(tokens.size(1), device=tokens.device)
        if self.sequence_parallel:  # this rank's positions and types
            start = group_rank(self.tp_group) * x.size(1)
            pos, types = pos.narrow(0, start, x.size(1)), types.narrow(1, start, x.size(1))
        x = x + self.position_embeddings(pos)
        if self.tokentype_embeddings is not None:
            x = x + self.tokentype_embeddings(types)
        if self.norm is not None:
            x = self.norm(x)
        if self.sequence_parallel:
            return sequence_shard_dropout(x, self.dropout, self.training, self.tp_group), *carried
        return F.dropout(x, self.dropout, self.training), *carried


class EncoderFinalNorm(nn.Module):
    """Megatron's BERT (pre-LN) normalises the last block's output; the padding mask ends here."""

    group = "final_norm"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)

    def forward_flops(self, seq: int) -> float:
        return 0.0

    def forward(self, x: tuple) -> torch.Tensor | tuple:
        """(x, padding) -> normalised x; (x, padding, predicted) -> (normalised x, padding, predicted)."""
        return self.norm(x[0]) if len(x) < 3 else (self.norm(x[0]), *x[1:])


class PretrainHead(nn.Module):
    """The pooler (first token, dense, tanh; with the binary head only, as Megatron's) and the MLM transform (dense,
    GELU, LayerNorm) -> (transformed hidden states, pooled) or the transformed hidden states alone."""

    group = "head"

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init):
        super().__init__()
        h = cfg.hidden_size
        self.predicted_share = predicted_share(cfg, ps)
        self.approximate = "none" if cfg.activation == "gelu_erf" else "tanh"
        self.pooler = Dense(init, "head.pooler", h, h) if cfg.family_knobs.binary_head else None
        self.transform = Dense(init, "head.transform", h, h)
        self.norm = make_norm(cfg)

    def forward_flops(self, seq: int) -> float:
        h = self.transform.weight.shape[0]
        return 2.0 * h * h * (self.predicted_share + (1 / seq if self.pooler is not None else 0))

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor | tuple:
        """x (B, T, C), (x, padding) (``bert``: no final norm) or (x, padding, predicted) -> the transformed rows
        (B, T, C), or (N, C) for the N predicted tokens in row-major order; and the pooled first tokens (B, C)."""
        predicted = None
        if isinstance(x, tuple):
            x, predicted = x[0], (x[2] if len(x) > 2 else None)
        rows = x if predicted is None else x[predicted.bool()]  # (B, T, C) or (N, C)
        h = self.norm(F.gelu(self.transform(rows), approximate=self.approximate))
        if self.pooler is None:
            return h
        # a copy of the first tokens: a view would keep all of x alive for the pooler's backward
        return h, torch.tanh(self.pooler(x[:, 0].contiguous()))  # ..., (B, C)


def tied_decoder(embedding: BertEmbedding, x: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """The MLM decoder: this rank's vocabulary slice of the logits from the word embeddings (bias in the next
    spec). The pooled output passes through."""
    if isinstance(x, tuple):
        return embedding.word_embeddings(x[0], logits=True), x[1]  # (B, T or N, V_padded / tp), (B, C)
    return embedding.word_embeddings(x, logits=True)


class VocabBias(nn.Module):
    """The MLM decoder's bias over the vocabulary, added to this rank's slice of the (padded) logits.

    The bias is kept whole, (vocab_size,), on every tp rank (replicated), not split like the logits: DeepSpeed's
    universal checkpoint (``mtnlg checkpoint reshard``) cannot merge or re-pad a one-dimensional vocabulary-split
    tensor. Each rank adds its slice of the padded bias; the slice's backward gives every rank the whole gradient
    (all-gathered; under sequence parallelism the replicated weights' gradient sum over tp does it)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        self.padded, self.tp_group, self.sequence_parallel = cfg.padded_vocab_size, ps.tp_group, ps.sequence_parallel
        self.bias = set_sharding(nn.Parameter(torch.zeros(cfg.vocab_size)), Sharding("replicated", (cfg.vocab_size,)))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        full = F.pad(self.bias, (0, self.padded - self.bias.numel()))  # (V_padded,), zeros past the vocabulary
        if self.sequence_parallel:
            per_rank = logits.size(-1)
            return logits + full.narrow(0, group_rank(self.tp_group) * per_rank, per_rank)
        return logits + scatter_to_tp(full, self.tp_group)  # (B, T or N, V_padded / tp)


class PretrainOutput(nn.Module):
    """The MLM vocabulary bias (vocab-parallel, like the logits it is added to) and the binary (sentence-order)
    head Linear(h, 2) on the pooled output."""

    group = "output"

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init):
        super().__init__()
        self.lm = VocabBias(cfg, ps)
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.binary = Dense(init, "output.binary", cfg.hidden_size, 2) if cfg.family_knobs.binary_head else None

    def forward_flops(self, seq: int) -> float:
        return 0.0 if self.binary is None else 4.0 * self.binary.weight.shape[1] / seq

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if self.binary is None:
            return self.lm(x)
        logits, pooled = x
        sop = self.binary(pooled)  # (B, 2); under sequence parallelism from this rank's first token
        if self.sequence_parallel:
            sop = from_first_tp_rank(sop, self.tp_group)
        return self.lm(logits), sop  # (B, T, V_padded / tp), (B, 2)


class BertLoss:
    """MLM cross-entropy, mean over the predicted tokens of the micro batch (vocab-parallel), plus the sentence-order
    cross-entropy (mean over the micro batch) when the model has the binary head.

    Each call's terms are kept (detached) until ``take_terms``: the training loop logs them as ``lm_loss`` and
    ``sop_loss`` (``term_names``), averaged over the step's micro batches."""

    def __init__(self, tp_group, vocab_size: int, binary_head: bool):
        self.tp_group, self.vocab_size, self.binary_head = tp_group, vocab_size, binary_head
        self.term_names = ("lm_loss", "sop_loss") if binary_head else ("lm_loss",)
        self.terms: list[torch.Tensor] = []

    def __call__(self, outputs: torch.Tensor | tuple, labels: tuple) -> torch.Tensor:
        lm_labels, loss_mask, is_random = labels
        logits = outputs[0] if self.binary_head else outputs
        if logits.dim() == 2:  # (N, V/tp): the predicted tokens' rows only, in row-major order (``predicted``)
            target = lm_labels[loss_mask.bool()]
        else:
            target = lm_labels.masked_fill(loss_mask == 0, IGNORE)
        per_token = vocab_parallel_cross_entropy(logits, target, self.tp_group, self.vocab_size, IGNORE)
        lm = per_token.sum() / loss_mask.sum().clamp(min=1)
        if not self.binary_head:
            self.terms.append(lm.detach().float().reshape(1))
            return lm
        sop = F.cross_entropy(outputs[1].float(), is_random)
        self.terms.append(torch.stack([lm.detach().float(), sop.detach().float()]))
        return lm + sop

    def take_terms(self) -> torch.Tensor:
        """(sum of each term, micro batches) since the last call, on this rank; then forgets them."""
        device = self.terms[0].device if self.terms else torch.device("cpu")
        out = torch.zeros(len(self.term_names) + 1, device=device)
        if self.terms:
            out[:-1] = torch.stack(self.terms).sum(0)
            out[-1] = len(self.terms)
        self.terms = []
        return out


class TaskHead(nn.Module):
    """A fine-tuning head (``model.head``): ``classify``: pooler (first token, dense, tanh), dropout, Linear(h, N)
    -> (B, N); ``multiple_choice``: the same with Linear(h, 1), one score per (row, choice) -> (B * C,);
    ``span``: Linear(h, 2) on every token -> start and end logits (B, T, 2)."""

    group = "head"

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init):
        super().__init__()
        h, k = cfg.hidden_size, cfg.family_knobs
        self.kind, self.dropout = k.head, cfg.hidden_dropout
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.pooler = Dense(init, "head.pooler", h, h) if k.head != "span" else None
        if k.head == "span":
            self.qa = Dense(init, "head.qa", h, 2)
        else:
            self.classifier = Dense(init, "head.classifier", h, k.num_classes if k.head == "classify" else 1)

    def forward_flops(self, seq: int) -> float:
        mats = [p for p in self.parameters() if p.dim() == 2]
        if self.kind == "span":
            return 2.0 * mats[0].numel()
        return 2.0 * sum(p.numel() for p in mats) / seq

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor:
        if isinstance(x, tuple):  # ``bert`` (post-LN) has no final norm
            x = x[0]
        if self.kind == "span":
            spans = self.qa(x)  # (B, T, 2), or this rank's (B, T/tp, 2)
            return gather_sequence_once(spans, self.tp_group) if self.sequence_parallel else spans
        pooled = F.dropout(torch.tanh(self.pooler(x[:, 0])), self.dropout, self.training)
        logits = self.classifier(pooled)  # (B, N) or (B * C, 1)
        if self.sequence_parallel:  # the first token is rank 0's
            logits = from_first_tp_rank(logits, self.tp_group)
        return logits.squeeze(-1) if self.kind == "multiple_choice" else logits


class TaskLoss:
    """Cross-entropy of a fine-tuning head: classes (labels (B,)), choices (labels (B,): the right choice of each
    row's C choices) or answer spans (labels (B, 2): start and end token; the mean of the two, as HF's)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "span":
            return (F.cross_entropy(logits[..., 0].float(), labels[:, 0])
                    + F.cross_entropy(logits[..., 1].float(), labels[:, 1])) / 2
        if self.kind == "multiple_choice":
            logits = logits.reshape(labels.size(0), -1)  # (B, C)
        return F.cross_entropy(logits.float(), labels)


def make_loss(cfg: ModelConfig, ps: ParallelState):
    """The loss of the model's head: MLM + SOP (pretraining) or the task head's cross-entropy."""
    if cfg.family_knobs.head == "pretrain":
        return BertLoss(ps.tp_group, cfg.vocab_size, cfg.family_knobs.binary_head)
    return TaskLoss(cfg.family_knobs.head)


def layer_specs(cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init) -> list[LayerSpec]:
    """The model as a list of LayerSpecs (cfg must be resolved)."""
    first = TiedLayerSpec(TIED_KEY, BertEmbedding, cfg, ps, init, tied_weight_attr=TIED_ATTR)
    decoder = TiedLayerSpec(TIED_KEY, BertEmbedding, cfg, ps, init, output_only=True, forward_fn=tied_decoder,
                            tied_weight_attr=TIED_ATTR)
    blocks = [LayerSpec(TransformerBlock, cfg, ps, rng, init, i, mask="bidirectional", carries=("padding",))
              for i in range(cfg.num_layers)]
    final = [LayerSpec(EncoderFinalNorm, cfg)] if cfg.norm_position == "pre" else []
    if cfg.family_knobs.head != "pretrain":  # the embedding keeps its (tied) name: a pretrained model loads as is
        return [first, *blocks, *final, LayerSpec(TaskHead, cfg, ps, init)]
    return [first, *blocks, *final, LayerSpec(PretrainHead, cfg, ps, init), decoder,
            LayerSpec(PretrainOutput, cfg, ps, init)]


def tied_weight_names(cfg: ModelConfig) -> list[str]:
    return [f"tied_modules.{TIED_KEY}.{TIED_ATTR}"] if cfg.family_knobs.head == "pretrain" else []


class BertModel(SpecModel):
    """The layer specs built into one module, named as DeepSpeed's PipelineModule names them (``specs=range(a, b)``:
    one pipeline stage)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState | None = None, seed: int = 1234,
                 rng: TPRandom | None = None, specs: range | None = None):
        super().__init__(cfg, ps, seed, rng, specs, layer_specs, make_loss)

    def forward(self, inputs: tuple, labels: tuple | None = None) -> torch.Tensor | tuple:
        """The loss (scalar) with ``labels``; else the full-vocabulary MLM logits (B, T, vocab_size) and, with the
        binary head, the SOP logits (B, 2)."""
        if labels is None:
            inputs = inputs[:3]  # logits for every token
        out = self.hidden_and_logits(inputs)  # (multiple choice: inputs (B, C, T) run as B * C rows)
        if labels is not None:
            return self.loss_fn(out, labels)
        head = self.cfg.family_knobs.head
        if head != "pretrain":
            return out.reshape(inputs[0].shape[:2]) if head == "multiple_choice" else out
        if not self.cfg.family_knobs.binary_head:
            return gather_from_tp(out, self.ps.tp_group)[..., : self.cfg.vocab_size]
        logits, sop = out
        return gather_from_tp(logits, self.ps.tp_group)[..., : self.cfg.vocab_size], sop



# --------------------------------------------------------------------------- data


FIELDS_IN = ("tokens", "types", "padding_mask")
FIELDS_LABELS = ("labels", "loss_mask")


def collate(samples: list[dict]) -> tuple[tuple, tuple | torch.Tensor]:
    """BERT samples (dicts of numpy arrays: ``mtnlg.data.bert_dataset``) -> ((tokens, types, padding), labels),
    int64 tensors. Labels: pretraining samples' (labels, loss_mask, is_random); a fine-tuning sample's ``label``
    (classification; multiple choice, whose inputs are (C, T) each) or ``start_position`` and ``end_position``
    (spans: (B, 2))."""
    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples]).astype(np.int64))

    inputs = tuple(stack(k) for k in FIELDS_IN)
    first = samples[0]
    if "label" in first:
        return inputs, stack("label").reshape(-1)
    if "start_position" in first:
        return inputs, torch.stack([stack("start_position").reshape(-1), stack("end_position").reshape(-1)], 1)
    labels = (*(stack(k) for k in FIELDS_LABELS), stack("is_random").reshape(-1))
    return (*inputs, labels[1]), labels  # the loss mask also as input ``predicted``: the head's rows


def sources(cfg):
    """(train, valid) BERT sample sources: masked sentence pairs from the run's data (``mtnlg.data.bert_dataset``),
    or, with ``data.synthetic``, Markov-chain walks made into masked pairs (``mtnlg.data.bert_synthetic``)."""
    if cfg.data.sft is not None:
        from mtnlg.errors import UserError

        raise UserError("data.sft (prompt/response fine-tuning) is for GPT and T5 models; a BERT model is "
                        "fine-tuned on a task's data (docs/bert.md); remove data.sft")
    if cfg.data.synthetic is not None:
        from mtnlg.data.bert_synthetic import synthetic_bert_sources

        return synthetic_bert_sources(cfg)
    from mtnlg.data.bert_dataset import build_bert_sources

    return build_bert_sources(cfg)


def tokenizer(cfg):
    """The run's WordPiece tokenizer (``mtnlg.data.bert_dataset.bert_tokenizer``; the default corpus's when no data
    is configured)."""
    from mtnlg.data.bert_dataset import bert_tokenizer

    return bert_tokenizer(cfg.data)


def no_token_windows(samples: torch.Tensor):
    raise TypeError("BERT trains on sentence pairs (Family.collate of mtnlg.model.bert), not on token windows")


def token_lookups(module: nn.Module) -> list[nn.Module]:
    return [m.word_embeddings for m in module.modules() if isinstance(m, BertEmbedding)]


FAMILY = Family(
    name="bert",
    layer_specs=layer_specs,
    model=BertModel,
    loss=make_loss,
    micro_batch=no_token_windows,
    tied_weight_names=tied_weight_names,
    token_lookups=token_lookups,
    hf_model_types=("megatron-bert", "bert"),
    memory=bert_memory,
    causal_lm=False,
    sources=sources,
    tokenizer=tokenizer,
    collate=collate,
)
