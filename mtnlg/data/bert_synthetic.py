"""Synthetic BERT samples (``data.synthetic`` with a BERT model): walks of the Markov chain of
``mtnlg.data.synthetic`` made into masked sentence pairs, in the sample format of ``mtnlg.data.bert_dataset``.

Sample i is a function of (seed, stream, i) only, so every layout, rank and resume point sees the same samples.
A walk of ``seq_length - 3`` tokens is cut in two at a random point (A, B); with probability 1/2 they are swapped
(``is_random`` = 1: the sentence-order label); ``[CLS] A [SEP] B [SEP]`` gets token types 0 / 1; with probability
``short_seq_prob`` the pair is shorter and the rest padded. ``mask_prob`` of the A/B tokens are predicted: 80%
replaced by ``[MASK]``, 10% by a random token, 10% kept. The chain's tokens are ids 0 .. V-5 (V the vocabulary);
the last four ids are the special tokens: [PAD] = V-4, [CLS] = V-3, [SEP] = V-2, [MASK] = V-1. Validation walks
another stream of the same chain.

Fine-tuning heads (``model.head``) get task samples from the same pairs, unmasked: ``classify``: ``label`` = the
first token of A modulo ``num_classes``; ``multiple_choice``: four pairs (samples 4i .. 4i+3) as (4, T) inputs,
``label`` = the choice whose first token of A is largest; ``span``: ``start_position`` / ``end_position`` = the
first and last token of B.
"""

from __future__ import annotations

import numpy as np

from mtnlg.data.synthetic import MarkovSource

SPECIALS = 4  # [PAD], [CLS], [SEP], [MASK] at the top of the vocabulary


class SyntheticBertSource:
    def __init__(self, vocab_size: int, branching: int, seq_length: int, seed: int, stream: int, mask_prob: float,
                 short_seq_prob: float, head: str = "pretrain", num_classes: int = 2):
        if vocab_size - SPECIALS < max(branching, 2):
            raise ValueError(f"vocab_size {vocab_size} leaves no room for the chain and 4 special tokens")
        self.seq_length, self.seed, self.stream = seq_length, seed, stream
        self.mask_prob, self.short_seq_prob = mask_prob, short_seq_prob
        self.head, self.num_classes = head, num_classes
        self.chain = MarkovSource(vocab_size - SPECIALS, branching, seq_length - 3, seed, stream)
        self.vocab = vocab_size - SPECIALS
        self.pad, self.cls, self.sep, self.mask = (vocab_size - SPECIALS + k for k in range(SPECIALS))

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self.head == "pretrain":
            return self.pair(index)
        if self.head == "multiple_choice":
            choices = [self.pair(4 * index + c, masked=False) for c in range(4)]
            out = {k: np.stack([c[k] for c in choices]) for k in ("tokens", "types", "padding_mask")}
            return {**out, "label": np.int64(np.argmax([c["tokens"][1] for c in choices]))}
        x = self.pair(index, masked=False)
        out = {k: x[k] for k in ("tokens", "types", "padding_mask")}
        if self.head == "classify":
            return {**out, "label": np.int64(x["tokens"][1] % self.num_classes)}
        b = np.flatnonzero(x["types"] == 1)  # B and its closing [SEP]
        return {**out, "start_position": np.int64(b[0]), "end_position": np.int64(b[-2])}

    def pair(self, index: int, masked: bool = True) -> dict[str, np.ndarray]:
        """``[CLS] A [SEP] B [SEP]`` of sample ``index``, masked (pretraining) or not."""
        rng = np.random.default_rng([self.seed, self.stream, int(index), 0xBE27])
        walk = self.chain[index]  # seq_length - 2 tokens (MarkovSource's seq_length + 1)
        room = len(walk) - 1  # A and B: seq_length - 3 tokens at most
        n = int(rng.integers(2, room + 1)) if rng.random() < self.short_seq_prob else room
        cut = int(rng.integers(1, n))
        a, b = walk[:cut], walk[cut:n]
        is_random = int(rng.random() < 0.5)
        if is_random:
            a, b = b, a
        T = self.seq_length
        tokens = np.full(T, self.pad, dtype=np.int64)
        types = np.zeros(T, dtype=np.int64)
        body = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]])
        tokens[: len(body)] = body
        types[len(a) + 2 : len(body)] = 1
        padding_mask = (np.arange(T) < len(body)).astype(np.int64)
        if not masked:
            return {"tokens": tokens, "types": types, "padding_mask": padding_mask, "is_random": np.int64(is_random)}
        candidates = np.flatnonzero(padding_mask & (tokens < self.vocab))
        k = max(1, int(round(self.mask_prob * len(candidates))))
        chosen = np.sort(rng.choice(candidates, k, replace=False))
        labels = np.full(T, -1, dtype=np.int64)
        labels[chosen] = tokens[chosen]
        loss_mask = np.zeros(T, dtype=np.int64)
        loss_mask[chosen] = 1
        u = rng.random(k)
        tokens[chosen[u < 0.8]] = self.mask
        rand = chosen[(u >= 0.8) & (u < 0.9)]
        tokens[rand] = rng.integers(0, self.vocab, len(rand))
        return {"tokens": tokens, "types": types, "labels": labels, "loss_mask": loss_mask,
                "padding_mask": padding_mask, "is_random": np.int64(is_random)}


def synthetic_bert_sources(cfg) -> tuple[SyntheticBertSource, SyntheticBertSource]:
    """(train, valid) of a resolved run config with ``data.synthetic`` and a BERT model."""
    s, m = cfg.data.synthetic, cfg.model
    k = m.family_knobs
    vocab = s.vocab_size or m.vocab_size

    def make(stream: int) -> SyntheticBertSource:
        return SyntheticBertSource(vocab, s.branching, m.seq_length, s.seed, stream, k.mask_prob, k.short_seq_prob,
                                   k.head, k.num_classes)

    return make(0), make(1)
