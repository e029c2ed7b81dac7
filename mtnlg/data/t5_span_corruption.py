"""T5's span corruption: noise spans of a token chunk become sentinels in the encoder input and the decoder's target.

    lengths = span_lengths(enc_length=512, noise_density=0.15, mean_noise_span_length=3.0)
    # lengths.raw = 568 tokens of text become an encoder input of exactly 512 and a target of lengths.dec = 114
    spans = random_span_ids(568, 0.15, 3.0, rng)                # 0: kept; k: the k-th noise span (1, 2, ...)
    enc, target = corrupt(tokens, spans, sentinel_ids, eos_id)

With tokens ``a b c d e f g`` and noise spans ``c d`` and ``f``::

    encoder input   a b <extra_id_0> e <extra_id_1> g EOS
    decoder target  <extra_id_0> c d <extra_id_1> f EOS

Two ways to pick the spans (``masking_style``):

- ``t5`` (the T5 paper, Hugging Face's ``run_t5_mlm_flax``): exactly ``round(L * density)`` noise tokens in
  ``round(noise / mean_noise_span_length)`` spans; noise and kept tokens are each cut into that many runs at
  uniformly random places and interleaved, a kept run first (so, as there, a chunk's first token is never noise
  and its last always is). Every chunk gives the same encoder and target
  lengths, so ``L`` is chosen as the longest chunk whose encoder input fits ``enc_length`` (``span_lengths``).
- ``ngram`` (Megatron's T5, after SpanBERT): span starts in random order, each span's length drawn from a
  geometric distribution (p 0.2) capped at 10 and shortened to stay within ``round(L * density)`` noise tokens;
  a span overlapping an earlier one is skipped. The number of spans varies, so the chunk is ``enc_length - 1``
  tokens (the encoder input never overflows; it is padded) and the target is sized for the worst case (a span
  per noise token) unless a shorter one is given, which then caps the spans of a sample.

Sentinel k is ``<extra_id_k>``; each span has its own, in order, in both sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtnlg.errors import UserError
from mtnlg.families.t5 import corrupted_lengths, span_counts, span_plan  # noqa: F401  (the one definition)

STYLES = ("t5", "ngram")
NGRAM_P = 0.2  # Megatron's (SpanBERT's) geometric span length
NGRAM_MAX = 10


@dataclass(frozen=True)
class SpanLengths:
    raw: int  # text tokens per sample
    enc: int  # encoder input (model.seq_length)
    dec: int  # decoder input / target


def span_lengths(enc_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                 style: str = "t5", dec_length: int | None = None) -> SpanLengths:
    """The chunk length and decoder length for an encoder input of ``enc_length`` (checked; one-line errors).

    ``t5``: the longest chunk whose corrupted encoder input is at most ``enc_length`` (Hugging Face's
    ``compute_input_and_target_lengths``); a given ``dec_length`` must hold the target."""
    if style not in STYLES:
        raise UserError(f"masking_style = {style!r} is not one of {', '.join(STYLES)}")
    if not 0.0 < noise_density < 1.0:
        raise UserError(f"noise_density = {noise_density} must be between 0 and 1 (T5 uses 0.15)")
    if not mean_noise_span_length >= 1.0:
        raise UserError(f"mean_noise_span_length = {mean_noise_span_length} must be at least 1 (T5 uses 3.0)")
    if enc_length < 4:
        raise UserError(f"model.seq_length = {enc_length} is too short for span corruption; use at least 4")
    raw, need, default = span_plan(enc_length, noise_density, mean_noise_span_length, style)
    if style == "t5":
        why = f"the target of a {raw}-token chunk is {need} tokens"
    else:
        why = f"{need - 2} noise tokens need at least {need} target tokens"
    if dec_length is None:
        dec_length = default
    if dec_length < need:
        raise UserError(
            f"decoder_seq_length = {dec_length} is too short for noise_density {noise_density} at model.seq_length "
            f"{enc_length} ({style} masking): {why}; set decoder_seq_length >= {need} or leave it out (derived)")
    return SpanLengths(raw=raw, enc=enc_length, dec=dec_length)


# --------------------------------------------------------------------------- choosing the spans


def _segment(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """``items`` cut into ``segments`` positive lengths, every cut equally likely."""
    cuts = np.sort(rng.choice(items - 1, segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [items]]))


def random_span_ids(length: int, noise_density: float, mean_noise_span_length: float,
                    rng: np.random.Generator) -> np.ndarray:
    """``t5`` style: int32[length], 0 for a kept token and k for a token of the k-th noise span."""
    noise, spans = span_counts(length, noise_density, mean_noise_span_length)
    runs = np.empty(2 * spans, dtype=np.int64)
    runs[0::2] = _segment(length - noise, spans, rng)  # kept runs come first
    runs[1::2] = _segment(noise, spans, rng)
    ids = np.zeros(2 * spans, dtype=np.int32)
    ids[1::2] = np.arange(1, spans + 1)
    return np.repeat(ids, runs)


def ngram_span_ids(length: int, noise_density: float, rng: np.random.Generator, max_target: int | None = None,
                   max_spans: int | None = None) -> np.ndarray:
    """``ngram`` style: int32[length] as ``random_span_ids``. ``max_target`` (the decoder length) and ``max_spans``
    (the sentinels) cap how many spans fit."""
    budget = min(max(int(round(length * noise_density)), 1), length - 1)
    covered = np.zeros(length, dtype=bool)
    chosen: list[tuple[int, int]] = []
    noise = 0
    for start in rng.permutation(length).tolist():
        if noise >= budget or (max_spans is not None and len(chosen) >= max_spans):
            break
        n = min(int(rng.geometric(NGRAM_P)), NGRAM_MAX, budget - noise, length - start)
        if max_target is not None:  # the target after this span: noise + n + (spans + 1) sentinels + EOS
            n = min(n, max_target - noise - len(chosen) - 2)
            if n < 1:
                break
        if covered[start:start + n].any():
            continue
        covered[start:start + n] = True
        chosen.append((start, n))
        noise += n
    ids = np.zeros(length, dtype=np.int32)
    for k, (start, n) in enumerate(sorted(chosen), 1):
        ids[start:start + n] = k
    return ids


# --------------------------------------------------------------------------- building the sequences


def corrupt(tokens: np.ndarray, span_ids: np.ndarray, sentinel_ids: np.ndarray,
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder target): each noise span replaced by its sentinel, and the spans after theirs.

    ``span_ids`` numbers the spans 1, 2, ... in order (adjacent spans with different numbers stay apart)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    noisy = span_ids != 0
    first = noisy & (span_ids != np.concatenate([[0], span_ids[:-1]]))  # a span's first token
    sentinel = np.asarray(sentinel_ids, dtype=np.int64)
    enc = np.where(first, sentinel[np.maximum(span_ids, 1) - 1], tokens)[~noisy | first]
    where = np.flatnonzero(noisy)
    starts = np.flatnonzero(first[where])  # positions within the noise tokens where a span begins
    target = np.insert(tokens[where], starts, sentinel[span_ids[where][starts] - 1])
    return np.append(enc, eos_id), np.append(target, eos_id)


def uncorrupt(enc: np.ndarray, target: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
    """The chunk a corrupted pair came from: every sentinel of ``enc`` replaced by the tokens that follow the same
    sentinel in ``target``. Both without padding; their last token (EOS) is dropped (the chunk itself may hold
    EOS tokens: document ends). For tests and inspection."""
    sentinel_of = {int(s): k for k, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current: list[int] = []
    for t in np.asarray(target)[:-1].tolist():
        if t in sentinel_of:
            current = spans.setdefault(sentinel_of[t], [])
        else:
            current.append(t)
    out: list[int] = []
    for t in np.asarray(enc)[:-1].tolist():
        out += spans.get(sentinel_of[t], []) if t in sentinel_of else [t]
    return np.asarray(out, dtype=np.int64)


def t5_sample(enc: np.ndarray, target: np.ndarray, lengths: SpanLengths, pad_id: int) -> dict[str, np.ndarray]:
    """The sample dict the T5 family takes, padded to ``lengths.enc`` / ``lengths.dec`` (cut if longer).

    ``dec_inputs`` is the target shifted right behind the decoder start token (``pad_id``, as Hugging Face's T5
    does); ``dec_labels`` is the target with -1 on padding; the padding masks are 1 on real tokens."""
    E, D = lengths.enc, lengths.dec
    enc, target = np.asarray(enc, dtype=np.int64)[:E], np.asarray(target, dtype=np.int64)[:D]
    enc_tokens = np.full(E, pad_id, dtype=np.int64)
    enc_tokens[: len(enc)] = enc
    enc_mask = np.zeros(E, dtype=np.int64)
    enc_mask[: len(enc)] = 1
    labels = np.full(D, -1, dtype=np.int64)
    labels[: len(target)] = target
    dec_inputs = np.full(D, pad_id, dtype=np.int64)
    dec_inputs[1 : len(target)] = target[:-1]
    dec_mask = np.zeros(D, dtype=np.int64)
    dec_mask[: len(target)] = 1
    return {"enc_tokens": enc_tokens, "enc_padding_mask": enc_mask, "dec_inputs": dec_inputs,
            "dec_labels": labels, "dec_padding_mask": dec_mask}
