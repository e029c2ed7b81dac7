"""T5 training samples: span corruption over indexed datasets, and prompt -> response pairs for fine-tuning.

    train, valid = build_t5_sources(cfg)       # cfg: a resolved RunConfig with model.architecture a T5 one
    s = train[i]                               # global sample i: a dict of int64 arrays
    s["enc_tokens"], s["enc_padding_mask"]     # (model.seq_length,); mask 1 on real tokens
    s["dec_inputs"], s["dec_labels"], s["dec_padding_mask"]   # (decoder length,); labels -1 on padding

Pretraining (``data.prefix`` / ``data.blend`` / the default corpus): the documents are split, shuffled and cut
into chunks exactly as GPT's samples are (``mtnlg.data.gpt_dataset``: same split by documents, same cached
indices next to the data), a chunk being ``lengths.raw`` tokens; each chunk is span-corrupted
(``mtnlg.data.t5_span_corruption``) with a generator seeded by (``train.seed``, split, sample index), so sample i
is the same on every rank, in every worker and in every rerun.

Fine-tuning (``data.sft``, a ``preprocess --sft`` output, split by examples as GPT's fine-tuning is): an
example's last run of loss tokens (the response and its EOD, or a chat's last assistant message) is the
decoder's target; everything before it, cut to ``model.seq_length - 1`` tokens, plus EOD is the encoder input.

The knobs (``model:`` keys of the T5 family, read as ``model.family_knobs.<key>``): ``noise_density`` (0.15),
``mean_noise_span_length`` (3.0), ``masking_style`` (``t5`` | ``ngram``), ``vocab_extra_ids`` (100: the
sentinels the tokenizer gets unless it has them) and ``decoder_seq_length`` (None: derived from the noise
density; set it for fine-tuning, whose responses the derived length may cut).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.config import RunConfig, parse_split
from mtnlg.data.gpt_dataset import build_datasets, build_tokenizer
from mtnlg.data.t5_span_corruption import (
    SpanLengths,
    corrupt,
    ngram_span_ids,
    random_span_ids,
    span_counts,
    span_lengths,
    t5_sample,
)
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import UserError

DEFAULTS: dict[str, Any] = {
    "noise_density": 0.15,
    "mean_noise_span_length": 3.0,
    "masking_style": "t5",
    "vocab_extra_ids": 100,
    "decoder_seq_length": None,
}


def knob(cfg: RunConfig, name: str) -> Any:
    """A T5 knob of the run config (its default when the family does not define it)."""
    return getattr(cfg.model.family_knobs, name, DEFAULTS[name])


def t5_lengths(cfg: RunConfig) -> SpanLengths:
    """(raw chunk, encoder, decoder) lengths of a run: the encoder is ``model.seq_length``, the rest derived."""
    return span_lengths(cfg.model.seq_length, knob(cfg, "noise_density"), knob(cfg, "mean_noise_span_length"),
                        knob(cfg, "masking_style"), knob(cfg, "decoder_seq_length"))


def t5_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The run's tokenizer with its sentinels and pad token (one-line errors when it has none)."""
    d = cfg.data
    tok = build_tokenizer(d, knob(cfg, "vocab_extra_ids"))
    if tok is None:
        raise UserError("T5's span corruption needs the tokenizer of the data (for its sentinels <extra_id_0> ...); "
                        "set data.tokenizer")
    if not tok.sentinel_ids:
        raise UserError(f"tokenizer {tok.name} has no sentinels (<extra_id_0> ...) for T5's span corruption; set "
                        "vocab_extra_ids: 100 in the model section or train one with "
                        "`mtnlg tokenizer train --vocab-extra-ids 100`")
    if tok.pad_id is None:
        raise UserError(f"tokenizer {tok.name} has no pad token (T5's decoder start token); add a <pad> token")
    return tok


# --------------------------------------------------------------------------- pretraining


class SpanCorruptionDataset:
    """Sample i: chunk i of ``text`` (a GPT dataset of ``lengths.raw`` tokens per sample), span-corrupted."""

    def __init__(self, text: Any, lengths: SpanLengths, style: str, noise_density: float,
                 mean_noise_span_length: float, sentinel_ids: list[int], eos_id: int, pad_id: int,
                 seed: int, stream: int) -> None:
        self.text, self.lengths, self.style = text, lengths, style
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64)
        self.eos_id, self.pad_id, self.seed, self.stream = eos_id, pad_id, seed, stream
        check_sentinels(lengths, style, noise_density, mean_noise_span_length, len(sentinel_ids))

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        raw = np.asarray(self.text[i][: self.lengths.raw], dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.stream, i])
        if self.style == "t5":
            spans = random_span_ids(len(raw), self.noise_density, self.mean_noise_span_length, rng)
        else:
            spans = ngram_span_ids(len(raw), self.noise_density, rng, self.lengths.dec, len(self.sentinel_ids))
        enc, target = corrupt(raw, spans, self.sentinel_ids, self.eos_id)
        return t5_sample(enc, target, self.lengths, self.pad_id)


def check_sentinels(lengths: SpanLengths, style: str, noise_density: float, mean_noise_span_length: float,
                    n: int) -> None:
    """Refuse chunks with more noise spans than sentinels (``ngram``: more than expected on average; a sample with
    more keeps the first ``n``)."""
    if style == "t5":
        spans = span_counts(lengths.raw, noise_density, mean_noise_span_length)[1]
    else:  # the expected number: the noise tokens at the geometric spans' mean length
        spans = int(round(lengths.raw * noise_density / _ngram_mean_span()))
    if spans > n:
        raise UserError(
            f"span corruption of {lengths.raw}-token chunks makes {spans} noise spans but the tokenizer has {n} "
            "sentinels; raise vocab_extra_ids (and the tokenizer's) or lower model.seq_length")


@functools.cache
def _ngram_mean_span() -> float:
    """Mean length of a geometric(p) span capped at the maximum (before the noise budget shortens any)."""
    from mtnlg.data.t5_span_corruption import NGRAM_MAX, NGRAM_P

    return float(sum((1 - NGRAM_P) ** k for k in range(NGRAM_MAX)))


def build_t5_sources(cfg: RunConfig) -> tuple[Any, Any]:
    """(train, valid) T5 sources of a resolved config; valid is None without validation. ``data.sft`` gives
    fine-tuning pairs (``build_t5_sft_sources``)."""
    d, t = cfg.data, cfg.train
    if d.sft is not None:
        return build_t5_sft_sources(cfg)
    if d.synthetic is not None:
        raise UserError("data.synthetic makes GPT token streams, not T5 samples; give data.prefix (or nothing: the "
                        "default corpus) for T5 pretraining")
    lengths = t5_lengths(cfg)
    tok = t5_tokenizer(cfg)
    style, density, mean = knob(cfg, "masking_style"), knob(cfg, "noise_density"), knob(cfg, "mean_noise_span_length")
    check_sentinels(lengths, style, density, mean, len(tok.sentinel_ids))
    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    try:
        train, valid, _ = build_datasets(d, lengths.raw, t.seed, (t.iters * t.global_batch_size, n_valid, 0))
    except UserError as e:  # GPT's words: say what seq_length means here
        raise UserError(f"{e} (T5's span corruption reads chunks of {lengths.raw} tokens for model.seq_length "
                        f"{lengths.enc})") from None
    if train is None:
        raise UserError(f"data.split = {d.split!r} leaves no documents for training")

    def wrap(text: Any, stream: int) -> SpanCorruptionDataset | None:
        if text is None:
            return None
        return SpanCorruptionDataset(text, lengths, style, density, mean, tok.sentinel_ids, tok.eod_id, tok.pad_id,
                                     t.seed, stream)

    return wrap(train, 0), wrap(valid, 1)


# --------------------------------------------------------------------------- fine-tuning


def split_prompt_response(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) of a ``preprocess --sft`` example: the response is the last run of loss tokens, the
    prompt everything before it."""
    on = np.asarray(mask) != 0
    starts = np.flatnonzero(on & ~np.concatenate([[False], on[:-1]]))
    if len(starts) == 0:
        raise ValueError("an SFT example without loss tokens")
    start = int(starts[-1])
    end = start + int(np.argmin(np.append(on[start:], False)))
    return np.asarray(ids[:start], dtype=np.int64), np.asarray(ids[start:end], dtype=np.int64)


def response_lengths(mask: Any, examples: np.ndarray) -> np.ndarray:
    """The length of each example's last run of loss tokens (its response and EOD), read from the loss mask
    (an ``IndexedDataset``) in one vectorised pass per block of examples."""
    out = np.zeros(len(examples), dtype=np.int64)
    for at in range(0, len(examples), 1 << 16):
        ex = examples[at : at + (1 << 16)]
        starts = mask.pointers[ex] // mask.dtype.itemsize
        sizes = mask.sizes[ex].astype(np.int64)
        flat = np.concatenate([mask._bin[a : a + n] for a, n in zip(starts, sizes)]) != 0
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        first = np.zeros(len(flat), dtype=bool)
        first[offsets[:-1]] = True
        run_start = flat & (first | ~np.concatenate([[False], flat[:-1]]))
        marks = np.where(run_start, np.arange(len(flat)), -1)
        last = np.maximum.reduceat(marks, offsets[:-1])  # each example's last run start (-1: none)
        off = np.flatnonzero(~flat)
        nxt = off[np.minimum(np.searchsorted(off, np.maximum(last, 0)), len(off) - 1)] if len(off) else offsets[1:]
        end = np.where((nxt > last) & (nxt < offsets[1:]), nxt, offsets[1:])
        out[at : at + len(ex)] = np.where(last >= 0, end - last, 0)
    return out


class T5SFTDataset:
    """Fine-tuning pairs: sample i is an example of ``examples`` (each epoch in a fresh order, ``seed`` + epoch)."""

    def __init__(self, prefix: str | Path, examples: range, lengths: SpanLengths, seed: int, num_samples: int,
                 eos_id: int, pad_id: int) -> None:
        from mtnlg.data.sft import load_sft

        self.tokens, self.mask = load_sft(prefix)
        self.examples = np.arange(len(self.tokens))[examples]
        if len(self.examples) == 0:
            raise ValueError("a T5SFTDataset needs at least one example")
        self.lengths, self.seed, self.num_samples = lengths, seed, num_samples
        long = response_lengths(self.mask, self.examples)
        if long.max() > lengths.dec:
            raise UserError(
                f"{int((long > lengths.dec).sum())} of {len(long)} examples of {prefix} have a response longer than "
                f"the decoder's {lengths.dec} tokens (the longest: {int(long.max())} with its EOD), which would cut "
                f"it and its EOD; set model.decoder_seq_length: {int(long.max())} (or shorten those responses)")
        self.eos_id, self.pad_id = eos_id, pad_id

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._perm = epoch, np.random.RandomState(self.seed + epoch).permutation(len(self.examples))
        return self._perm

    def example(self, i: int) -> int:
        """The example index of sample i."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        epoch, j = divmod(i, len(self.examples))
        return int(self.examples[self._order(epoch)[j]])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        e = self.example(i)
        prompt, response = split_prompt_response(self.tokens.get(e), self.mask.get(e))
        enc = np.append(prompt[: self.lengths.enc - 1], self.eos_id)
        return t5_sample(enc, response, self.lengths, self.pad_id)


def build_t5_sft_sources(cfg: RunConfig) -> tuple[T5SFTDataset, T5SFTDataset | None]:
    """(train, valid) fine-tuning pairs of ``data.sft.prefix``, split by examples (``data.split``)."""
    from mtnlg.data.sft import load_sft

    d, t = cfg.data, cfg.train
    if d.sft is None:
        raise ValueError("build_t5_sft_sources needs data.sft")
    dec = knob(cfg, "decoder_seq_length")
    if dec is not None and dec < 1:
        raise UserError(f"decoder_seq_length = {dec} must be a positive integer")
    # the encoder is model.seq_length, the decoder decoder_seq_length (unset: span corruption's derived length);
    # span corruption's own floor on decoder_seq_length does not apply to fine-tuning pairs
    lengths = SpanLengths(raw=cfg.model.seq_length, enc=cfg.model.seq_length, dec=dec or t5_lengths(cfg).dec)
    tok = t5_tokenizer(cfg)
    n = len(load_sft(d.sft.prefix)[0])
    fractions = parse_split(d.split)
    n_train, n_valid = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    if n_train == 0:
        raise UserError(f"data.split = {d.split!r} leaves none of the {n} examples of {d.sft.prefix} for training")
    train = T5SFTDataset(d.sft.prefix, range(0, n_train), lengths, t.seed, t.iters * t.global_batch_size,
                         tok.eod_id, tok.pad_id)
    valid = None
    if t.eval_interval and t.eval_iters and n_valid:
        valid = T5SFTDataset(d.sft.prefix, range(n_train, n_train + n_valid), lengths, t.seed + 1,
                             t.eval_iters * t.global_batch_size, tok.eod_id, tok.pad_id)
    return train, valid
