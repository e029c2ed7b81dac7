"""T5: one encoder-decoder definition for every layout, a list of DeepSpeed LayerSpecs.

    [embedding] + [encoder block] * E + [encoder final norm]
      + [embedding again, on the decoder's ids] + [decoder block] * D + [final norm] + [output layer]

The token embedding is one module shared by both stacks (and by a tied output layer): a DeepSpeed tied module
(``tied_modules.embed``), so the stages holding its uses sum its gradient. What travels between the specs (and
DeepSpeed's pipeline stages) is a tuple:

    embedding          (enc_ids, enc_padding, dec_ids, dec_padding) -> (x, enc_padding, dec_ids, dec_padding)
    encoder blocks     (x, position_bias, enc_padding, dec_ids, dec_padding): the first block computes the
                       bidirectional relative position bias and inserts it, the last one drops it
    encoder final norm -> (context, enc_padding, dec_ids, dec_padding)
    decoder embedding  -> (y, context, enc_padding, dec_padding)
    decoder blocks     (y, position_bias, context, enc_padding, dec_padding): the first inserts the causal bias,
                       the last returns y alone
    final norm, output layer -> this rank's vocabulary slice of the logits

So the encoder's output rides through every decoder stage beside the decoder's activations, and the gradient of
each stage's cross-attention reaches it through the carried tensor: autograd sums it on the stage, DeepSpeed's
pipeline sends it back with the rest, down to the encoder. Every tensor with a gradient that enters a stage is
used on it (the biases are dropped where their stack ends), as DeepSpeed's pipeline engine requires.

Sequence parallelism (``parallel.sequence_parallel``): x, y and the carried encoder output are this rank's
sequence shards ((B, T/tp, C), each stack at its own length) outside the tensor-parallel GEMMs: the embedding
reduce-scatters, the column-parallel projections (the cross-attention's keys and values too: the encoder output
gathered) all-gather their input, the row-parallel ones reduce-scatter their output. The gradient of the gathered
encoder output is reduce-scattered back to its shards (summing every rank's heads); the paddings and the relative
position bias stay whole (they belong to the attention core, which sees the whole sequence).

Hugging Face's T5 v1.1 layout (RMSNorm without bias, no biases, no 1/sqrt(d) scaling, gated-GELU, untied output);
the original T5's ReLU and tied output layer (its input scaled by d_model^-0.5) as knobs (``mtnlg.families.t5``).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.families.t5 import decoder_length, depths
from mtnlg.model import t5_memory
from mtnlg.model.blocks import TransformerBlock, make_norm
from mtnlg.model.kv_cache import KVSlot
from mtnlg.model.registry import Family, is_block
from mtnlg.model.stages import SpecModel
from mtnlg.parallel import Init, ParallelState, TPRandom, VocabParallelEmbedding, gather_from_tp
from mtnlg.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.parallel.layers import Sharding, sequence_shard_dropout, set_sharding
from mtnlg.parallel.mappings import group_rank
from mtnlg.parallel.pipeline import balanced_parts

TIED_KEY = "embed"
TIED_ATTR = "word_embeddings.weight"
IGNORE = -1  # labels of padded decoder positions (mtnlg.data.t5_dataset)
ENCODER_CARRIES = ("position_bias", "padding", "dec_ids", "dec_padding")
DECODER_CARRIES = ("position_bias", "context", "context_padding", "padding")
ACTIVATIONS = {"gated-gelu": "geglu", "relu": "relu"}  # model.feed_forward -> the block's MLP


def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position): exact buckets for small distances,
    logarithmically wider ones up to ``max_distance`` (everything beyond shares the last); bidirectional: half the
    buckets for keys after the query, half for those before; causal: only keys before (or at) the query count."""
    if bidirectional:
        buckets //= 2
        offset = (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        offset = torch.zeros_like(relative)
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    wide = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                    * (buckets - exact)).long()
    wide = wide.clamp(max=buckets - 1)
    return offset + torch.where(distance < exact, distance, wide)


class RelativeBias(nn.Module):
    """The relative position bias of one stack: a (buckets, heads) table split by heads over tp (each rank holds its
    heads' columns), read into a (1, heads/tp, T, S) additive attention bias."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init, name: str, bidirectional: bool):
        super().__init__()
        k = cfg.family_knobs
        self.bidirectional, self.buckets, self.max_distance = (bidirectional, k.relative_attention_num_buckets,
                                                               k.relative_attention_max_distance)
        shape = (self.buckets, cfg.num_attention_heads)
        local = init.shard(f"{name}.weight", shape, 1, group_rank(ps.tp_group), ps.tp_size)
        self.weight = set_sharding(nn.Parameter(local), Sharding("row", shape, 1))

    def forward(self, T: int, S: int, device, first_query: torch.Tensor | int = 0) -> torch.Tensor:
        """(1, heads/tp, T, S); query i is at position ``first_query + i`` (decoding), key j at j."""
        q = torch.arange(T, device=device)[:, None] + first_query
        rel = torch.arange(S, device=device)[None, :] - q
        b = relative_buckets(rel, self.bidirectional, self.buckets, self.max_distance)
        # contiguous: it may be sent to the next pipeline stage (torch.distributed sends contiguous tensors only)
        return F.embedding(b, self.weight).permute(2, 0, 1).unsqueeze(0).contiguous()


class T5Block(TransformerBlock):
    """An encoder block (bidirectional self-attention, MLP) or a decoder block (causal self-attention,
    cross-attention over the encoder's output, MLP): the shared ``TransformerBlock`` with T5's scaling (none),
    feed-forward and carried position bias. The first block of a stack holds the stack's relative bias table and
    computes the bias once for all the stack's blocks; the last one drops what the next specs no longer need."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init, layer_number: int,
                 decoder: bool, first: bool, last: bool):
        super().__init__(cfg, ps, rng, init, layer_number, mask="causal" if decoder else "bidirectional",
                         cross_attention=decoder, carries=DECODER_CARRIES if decoder else ENCODER_CARRIES,
                         attention_scale=1.0, activation=ACTIVATIONS[cfg.family_knobs.feed_forward])
        self.decoder, self.first, self.last = decoder, first, last
        self.decoder_ratio = decoder_length(cfg) / cfg.seq_length  # decoder tokens per encoder token
        self.relative_bias = RelativeBias(cfg, ps, init, f"{self.group}.relative_bias", not decoder) \
            if first else None

    def forward_flops(self, seq: int) -> float:
        """Forward FLOPs per *encoder* token of a sample whose encoder has ``seq`` tokens (the decoder
        ``seq x decoder_seq_length / seq_length``): a sample's FLOPs over its encoder tokens, so that encoder and
        decoder blocks add up (pipeline balance, MFU)."""
        def mats(module) -> float:
            return 2.0 * sum(math.prod(p.sharding.full_shape) for p in module.parameters()
                             if p.sharding.kind != "replicated" and len(p.sharding.full_shape) == 2)

        lookups = mats(self.relative_bias) if self.relative_bias is not None else 0.0
        if not self.decoder:
            return mats(self) - lookups + 4.0 * seq * self.attn.query_width
        dec = seq * self.decoder_ratio
        kv = mats(self.cross_attn.kv)  # applied to the encoder's tokens
        per_sample = (dec * (mats(self) - lookups - kv) + seq * kv
                      + 4.0 * dec * dec * self.attn.query_width + 4.0 * dec * seq * self.cross_attn.query_width)
        return per_sample / seq

    def forward(self, x: tuple, kv=None) -> torch.Tensor | tuple:
        x, *rest = x
        if self.first:
            padding = rest[0] if not self.decoder else rest[-1]  # (B, T): this stack's full length
            T = padding.size(1)
            if kv is None:
                bias = self.relative_bias(T, T, x.device)
            else:  # decoding: every row at the same position, keys over the whole cache (the mask cuts it)
                bias = self.relative_bias(T, kv.k.size(2), x.device, int(kv.start[0]))
            bias = bias.to(x.dtype)
            rest = [bias, *rest]
        out = super().forward((x, *rest), kv)
        if not self.last:
            return out
        return out[0] if self.decoder else (out[0], *out[2:])


class T5Embedding(nn.Module):
    """The shared token embedding (vocab-parallel) and dropout: the encoder's ids here, the decoder's through
    ``decoder_embedding`` (the same module, a second spec), and the output layer of a tied model
    (``tied_head``)."""

    group = "embed"

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init):
        super().__init__()
        self.dropout = cfg.hidden_dropout
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.padded_vocab_size, cfg.hidden_size, tp_group=ps.tp_group, init=init,
            name="embed.word", sequence_parallel=ps.sequence_parallel)

    def forward_flops(self, seq: int) -> float:
        return 0.0

    def head_flops(self) -> float:
        """FLOPs per decoder token of the output layer that reuses this embedding."""
        return 2.0 * math.prod(self.word_embeddings.weight.sharding.full_shape)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, C), or this rank's (B, T/tp, C) sequence shard under sequence parallelism."""
        return _dropout(self.word_embeddings(ids), self.dropout, self.training, self.tp_group, self.sequence_parallel)

    def forward(self, inputs: tuple) -> tuple:
        enc_ids, enc_padding, dec_ids, dec_padding = inputs
        return self.embed(enc_ids), enc_padding, dec_ids, dec_padding


def decoder_embedding(embedding: T5Embedding, inputs: tuple) -> tuple:
    """(context, enc_padding, dec_ids, dec_padding) -> (y, context, enc_padding, dec_padding)."""
    context, enc_padding, dec_ids, dec_padding = inputs
    return embedding.embed(dec_ids), context, enc_padding, dec_padding


def tied_head(embedding: T5Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The original T5's output layer: the embedding matrix, its input scaled by d_model^-0.5."""
    return embedding.word_embeddings(hidden * hidden.size(-1) ** -0.5, logits=True)


def _dropout(x: torch.Tensor, p: float, training: bool, tp_group, sequence_parallel: bool) -> torch.Tensor:
    if sequence_parallel:  # a sequence shard: the whole tensor's mask, cut (every layout drops the same elements)
        return sequence_shard_dropout(x, p, training, tp_group)
    return F.dropout(x, p, training)


class T5StackNorm(nn.Module):
    """The final RMSNorm of a stack and dropout; the encoder's passes the carried tensors on, the decoder's ends
    them. Under sequence parallelism x is this rank's sequence shard."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, group: str):
        super().__init__()
        self.group = group
        self.dropout = cfg.hidden_dropout
        self.tp_group, self.sequence_parallel = ps.tp_group, ps.sequence_parallel
        self.norm = make_norm(cfg)

    def forward_flops(self, seq: int) -> float:
        return 0.0

    def forward(self, x: torch.Tensor | tuple) -> torch.Tensor | tuple:
        def out(h: torch.Tensor) -> torch.Tensor:
            return _dropout(self.norm(h), self.dropout, self.training, self.tp_group, self.sequence_parallel)

        return (out(x[0]), *x[1:]) if isinstance(x, tuple) else out(x)


class T5LMHead(nn.Module):
    """Untied output layer (T5 v1.1): this rank's slice of the padded-vocabulary logits."""

    group = "head"

    def __init__(self, cfg: ModelConfig, ps: ParallelState, init: Init):
        super().__init__()
        self.head = VocabParallelEmbedding(cfg.vocab_size, cfg.padded_vocab_size, cfg.hidden_size,
                                           tp_group=ps.tp_group, init=init, name="head",
                                           sequence_parallel=ps.sequence_parallel)
        self.decoder_ratio = decoder_length(cfg) / cfg.seq_length

    def forward_flops(self, seq: int) -> float:
        return 2.0 * math.prod(self.head.weight.sharding.full_shape) * self.decoder_ratio

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, logits=True)


class T5Loss:
    """Mean cross-entropy over the decoder positions whose label is not -1 (padding)."""

    def __init__(self, tp_group, vocab_size: int):
        self.tp_group, self.vocab_size = tp_group, vocab_size

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_token = vocab_parallel_cross_entropy(logits, labels, self.tp_group, self.vocab_size, IGNORE)
        return per_token.sum() / (labels != IGNORE).sum().clamp(min=1)


def layer_specs(cfg: ModelConfig, ps: ParallelState, rng: TPRandom, init: Init) -> list:
    """The model as a list of LayerSpecs (cfg resolved)."""
    enc, dec = depths(cfg)

    def embed(**kw):
        return TiedLayerSpec(TIED_KEY, T5Embedding, cfg, ps, init, tied_weight_attr=TIED_ATTR, **kw)

    return [
        embed(),
        *[LayerSpec(T5Block, cfg, ps, rng, init, i, False, i == 0, i == enc - 1) for i in range(enc)],
        LayerSpec(T5StackNorm, cfg, ps, "encoder_final_norm"),
        embed(forward_fn=decoder_embedding),
        *[LayerSpec(T5Block, cfg, ps, rng, init, enc + j, True, j == 0, j == dec - 1) for j in range(dec)],
        LayerSpec(T5StackNorm, cfg, ps, "final_norm"),
        embed(forward_fn=tied_head) if cfg.family_knobs.tie_word_embeddings else LayerSpec(T5LMHead, cfg, ps, init),
    ]


def encoder_spec_count(cfg: ModelConfig) -> int:
    """Specs of the encoder: the embedding, its blocks and its final norm."""
    return depths(cfg)[0] + 2


def t5_loss(cfg: ModelConfig, ps: ParallelState) -> T5Loss:
    return T5Loss(ps.tp_group, cfg.vocab_size)


def tied_weight_names(cfg: ModelConfig) -> list[str]:
    return [f"tied_modules.{TIED_KEY}.{TIED_ATTR}"]  # the shared embedding: both stacks (and a tied head) use it


class T5Model(SpecModel):
    """The layer specs built into one module, named as DeepSpeed's PipelineModule names them (``specs=range(a, b)``:
    one pipeline stage)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState | None = None, seed: int = 1234,
                 rng: TPRandom | None = None, specs: range | None = None):
        super().__init__(cfg, ps, seed, rng, specs, layer_specs, t5_loss)

    def forward(self, inputs: tuple, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs`` = (enc_ids, enc_padding, dec_ids, dec_padding), each (B, T_enc or T_dec); the loss (scalar)
        with ``labels`` (B, T_dec), else full-vocabulary logits (B, T_dec, vocab_size)."""
        logits = self.hidden_and_logits(inputs)
        if labels is not None:
            return self.loss_fn(logits, labels)
        return gather_from_tp(logits, self.ps.tp_group)[..., : self.cfg.vocab_size]

    @torch.no_grad()
    def generate(self, enc_ids: torch.Tensor, enc_padding: torch.Tensor | None = None,
                 max_new_tokens: int = 16, eos_id: int | None = None, start_id: int = 0,
                 pick=None) -> torch.Tensor:
        """Decoding (pp = 1, any tp): the encoder once, then one decoder token at a time with a key/value cache for
        the decoder's self-attention and the cross-attention's keys and values of the encoder's output computed
        once. ``start_id``: the decoder start token (the tokenizer's pad, 0 in T5's layout); ``pick``: full-vocabulary
        logits (B, vocab) -> next ids (B,) (greedy: argmax). Returns (B, n) ids, n <= max_new_tokens (it stops
        once every row has produced ``eos_id``; rows that did are continued with ``start_id``, the pad)."""
        if self.ps.pp_size != 1 or self.ps.sequence_parallel:
            raise ValueError("generate needs the whole model (pp = 1) without sequence parallelism")
        B, device = enc_ids.size(0), enc_ids.device
        enc_padding = torch.ones_like(enc_ids) if enc_padding is None else enc_padding
        n = encoder_spec_count(self.cfg)
        start = torch.full((B, 1), start_id, dtype=torch.long, device=device)
        x = (enc_ids, enc_padding, start, torch.ones_like(start))
        for f in self._funcs[:n]:
            x = f(x)
        context = x[0]
        p = next(self.parameters())
        blocks = list(self._funcs[n + 1 : -2])
        cache = [KVSlot(B, self.cfg.num_kv_heads // self.ps.tp_size, max_new_tokens, self.cfg.head_dim, device,
                        p.dtype) for _ in blocks]
        embedding, tokens = self.tied_modules[TIED_KEY], start
        done, out = torch.zeros(B, dtype=torch.bool, device=device), []
        for _ in range(max_new_tokens):
            h = (embedding.embed(tokens), context, enc_padding, torch.ones_like(tokens))
            for block, slot in zip(blocks, cache):
                h = block(h, slot)
            for slot in cache:
                slot.start += 1
            logits = gather_from_tp(self._funcs[-1](self._funcs[-2](h)), self.ps.tp_group)[..., : self.cfg.vocab_size]
            nxt = logits[:, -1].argmax(-1) if pick is None else pick(logits[:, -1]).to(device)
            tokens = nxt[:, None].masked_fill(done[:, None], start_id)
            out.append(tokens)
            if eos_id is not None:
                done |= tokens[:, 0] == eos_id
                if bool(done.all()):
                    break
        for block in blocks:  # let the encoder's output go (the cross-attention keeps it while it may come again)
            block.cross_attn._context_cache = None
        return torch.cat(out, dim=1)

    def spec_flops(self, seq: int) -> list[float]:
        """Forward FLOPs of each spec this model holds per encoder token (a sample's FLOPs / its encoder tokens) at
        full (tp = 1) size; the encoder has ``seq`` tokens."""
        ratio = decoder_length(self.cfg) / self.cfg.seq_length
        out = []
        for f in self._funcs:
            if isinstance(f, partial):  # the decoder's embedding (no FLOPs) or a tied output layer
                out.append(f.args[0].head_flops() * ratio if f.func is tied_head else 0.0)
            else:
                out.append(f.forward_flops(seq))
        return out

    def pipeline_bounds(self, pp_size: int, flops: list[float]) -> list[int] | None:
        """``model.encoder_pipeline_stages`` = k: the encoder's specs balanced over the first k stages, the
        decoder's over the others; None (not set): balanced by FLOPs across both stacks."""
        split = self.cfg.family_knobs.encoder_pipeline_stages
        if split is None or pp_size < 2:
            return None
        n = encoder_spec_count(self.cfg)
        anchors = [is_block(f) for f in self._funcs]
        first = balanced_parts(flops[:n], split, anchors[:n])
        rest = balanced_parts(flops[n:], pp_size - split, anchors[n:])
        return first[:-1] + [n + b for b in rest]


def seq2seq_batch(windows: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """Token windows (synthetic data: ``data.synthetic``) -> a copy task: the encoder reads the window, the decoder
    writes it again from its second token (decoder_seq_length tokens, started by the pad id 0)."""
    return collate([window_sample(w) for w in windows.numpy()])


def window_sample(window: np.ndarray, dec_len: int | None = None) -> dict[str, np.ndarray]:
    enc = window[:-1].astype(np.int64)
    labels = window[1 : 1 + (dec_len or len(enc))].astype(np.int64)
    return {"enc_tokens": enc, "enc_padding_mask": np.ones_like(enc),
            "dec_inputs": np.concatenate([[0], labels[:-1]]).astype(np.int64), "dec_labels": labels,
            "dec_padding_mask": np.ones_like(labels)}


def collate(samples: list) -> tuple[tuple, torch.Tensor]:
    """T5 samples (dicts of int64 arrays: enc_tokens, enc_padding_mask, dec_inputs, dec_labels,
    dec_padding_mask; ``mtnlg.data.t5_dataset``) -> ((enc_ids, enc_padding, dec_ids, dec_padding), labels). Token
    windows (synthetic data) become the copy task of ``seq2seq_batch``."""
    samples = [s if isinstance(s, dict) else window_sample(np.asarray(s)) for s in samples]

    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(s[key], dtype=np.int64) for s in samples]))

    inputs = (stack("enc_tokens"), stack("enc_padding_mask"), stack("dec_inputs"), stack("dec_padding_mask"))
    return inputs, stack("dec_labels")


def sources(cfg):
    """The span-corruption datasets of a run (``mtnlg.data.t5_dataset``); for ``data.synthetic``, the copy task of
    its token windows at the model's decoder length."""
    if cfg.data.synthetic is not None:
        from mtnlg.data.synthetic import MarkovSource

        s, m = cfg.data.synthetic, cfg.model
        dec = min(decoder_length(m), m.seq_length)
        return tuple(CopyTask(MarkovSource(s.vocab_size or m.vocab_size, s.branching, m.seq_length, s.seed,
                                           stream=stream), dec) for stream in (0, 1))
    from mtnlg.data.t5_dataset import build_t5_sources

    return build_t5_sources(cfg)


class CopyTask:
    """T5 samples from token windows: the encoder reads a window, the decoder writes its first ``dec_len`` tokens
    again (shifted by one)."""

    def __init__(self, windows, dec_len: int):
        self.windows, self.dec_len = windows, dec_len

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return window_sample(np.asarray(self.windows[i]), self.dec_len)


def token_lookups(module: nn.Module) -> list[nn.Module]:
    return [m.word_embeddings for m in module.modules() if isinstance(m, T5Embedding)]


FAMILY = Family(
    name="t5",
    layer_specs=layer_specs,
    model=T5Model,
    loss=t5_loss,
    micro_batch=seq2seq_batch,
    tied_weight_names=tied_weight_names,
    token_lookups=token_lookups,
    hf_model_types=("t5",),
    memory=t5_memory,
    causal_lm=False,
    sources=sources,
    collate=collate,
    pipe_partitioned=False,
)
