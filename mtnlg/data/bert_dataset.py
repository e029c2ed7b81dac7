"""BERT pretraining samples over a sentence-split indexed dataset: sentence pairs with masked words.

    train, valid = build_bert_sources(cfg)      # cfg: a resolved RunConfig of the bert family
    s = train[i]   # dict of np.int64: tokens, types, labels, loss_mask, padding_mask [seq_length]; is_random []

The data is ``mtnlg preprocess --split-sentences`` output (one sequence per sentence, documents
through the document index), or with no data configured the default stdlib corpus split so (with
its own lower-cased WordPiece, ``mtnlg corpus --bert``); ``data.split`` cuts its documents into
train/valid/test ranges as for GPT. Megatron's BertDataset scheme, written afresh:

- sample map (cached as .npy next to the data, written temp-then-rename): each epoch walks the
  range's documents, gathering consecutive sentences of one document until they reach a target
  length, ``seq_length - 3`` (``[CLS] A [SEP] B [SEP]``), or with probability ``short_seq_prob``
  a length drawn uniformly from [2, seq_length - 3]; a group needs 2 sentences (1 without the
  binary head). Each epoch's groups are shuffled on their own (asking for more samples appends).
- sample i (its own RandomState, from the seed and i): the group is cut at a random sentence into
  A and B, swapped with probability 0.5 (``is_random``: the sentence-order label), the longer
  part trimmed at a random end until both fit the target; then ``mask_prob`` of the word
  pieces (at least one) are predicted, chosen as whole-word n-grams: at each word, in random
  order, n in 1..max_ngram with p(n) proportional to 1/n (shortened when it would overshoot,
  skipped when it overlaps), ``##`` pieces belonging to the word before them. A predicted
  piece becomes [MASK] (80%), stays (10%) or becomes a random ordinary piece (10%).

Without the binary head (``binary_head: false``) a sample is ``[CLS] A [SEP]`` and is_random is 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.config import parse_split
from mtnlg.data.gpt_dataset import (
    SPLIT_NAMES,
    BlendedDataset,
    _cache_dir,
    _pickle_memmaps,
    _unpickle_memmaps,
    build_tokenizer,
    cached_arrays,
    cached_blend_indices,
    file_digest,
    split_ranges,
)
from mtnlg.data.indexed import IndexedDataset
from mtnlg.errors import UserError

MAP_VERSION = 1
KNOB_DEFAULTS = {"mask_prob": 0.15, "short_seq_prob": 0.1, "max_ngram": 3, "binary_head": True}


def bert_knobs(model_cfg: Any) -> dict[str, Any]:
    """mask_prob, short_seq_prob, max_ngram, binary_head from the family's knobs (defaults where unset)."""
    knobs = getattr(model_cfg, "family_knobs", None)
    out = {k: getattr(knobs, k, v) for k, v in KNOB_DEFAULTS.items()}
    out = {k: KNOB_DEFAULTS[k] if v is None else v for k, v in out.items()}
    if not 0 < out["mask_prob"] < 1:
        raise UserError(f"model.mask_prob = {out['mask_prob']} must be in (0, 1)")
    if not 0 <= out["short_seq_prob"] <= 1:
        raise UserError(f"model.short_seq_prob = {out['short_seq_prob']} must be in [0, 1]")
    if int(out["max_ngram"]) != out["max_ngram"] or out["max_ngram"] < 1:
        raise UserError(f"model.max_ngram = {out['max_ngram']} must be a positive integer")
    return out


def default_bert_data(data_cfg: Any) -> tuple[str, str]:
    """(prefix, tokenizer_dir) of the default stdlib corpus split into sentences, WordPiece (built on first use)."""
    from mtnlg.data.corpus import default_cache_dir, ensure_default_bert_data

    cache = default_cache_dir()
    if data_cfg.cache_dir is not None:
        cache = Path(data_cfg.cache_dir) / cache.relative_to(cache.parent.parent)
    key = str(cache.resolve())
    if key not in _DEFAULT:
        _DEFAULT[key] = ensure_default_bert_data(cache)
    return _DEFAULT[key]


_DEFAULT: dict[str, tuple[str, str]] = {}


def bert_tokenizer(data_cfg: Any):
    """The run's WordPiece tokenizer: data.tokenizer (a directory), data.vocab_file (a BERT vocab.txt) or, with
    no data configured, the default corpus's."""
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.data.wordpiece import WordPieceTokenizer

    if data_cfg.tokenizer is None and data_cfg.vocab_file is None:
        if data_cfg.prefix is not None or data_cfg.blend is not None:
            raise UserError("BERT data needs a WordPiece tokenizer: set data.tokenizer (from `mtnlg tokenizer train "
                            "--type wordpiece`) or data.vocab_file (a BERT vocab.txt)")
        tok = load_tokenizer(default_bert_data(data_cfg)[1])
    else:
        tok = build_tokenizer(data_cfg)
    if not isinstance(tok, WordPieceTokenizer):
        raise UserError(f"BERT data needs a WordPiece tokenizer, but {tok.name} is not one; train one with "
                        "`mtnlg tokenizer train --type wordpiece` or pass a BERT vocab.txt as data.vocab_file")
    return tok


def build_bert_sources(cfg: Any) -> tuple[Any, Any]:
    """(train, valid) BERT sample sources of a resolved RunConfig; valid is None without validation."""
    d, m, t = cfg.data, cfg.model, cfg.train
    tok = bert_tokenizer(d)
    knobs = bert_knobs(m)
    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    counts = (t.iters * t.global_batch_size, n_valid)
    fractions = parse_split(d.split)
    if d.blend is not None:
        prefixes, weights = [b.prefix for b in d.blend], [b.weight for b in d.blend]
    else:
        prefixes, weights = [d.prefix or default_bert_data(d)[0]], [1.0]
    sources = [IndexedDataset(p) for p in prefixes]
    for s in sources:
        check_vocab(s, tok)
    out: list[Any] = []
    for split_id, n in enumerate(counts):
        if fractions[split_id] == 0 or n == 0:
            out.append(None)
            continue
        make = lambda s, k: _split(s, fractions, split_id, tok, m.seq_length, t.seed, k, d.cache_dir, knobs)  # noqa
        if len(sources) == 1:
            out.append(make(sources[0], n))
            continue
        index, sample = cached_blend_indices(weights, n, _cache_dir(sources[0], d.cache_dir), SPLIT_NAMES[split_id])
        per = np.bincount(index, minlength=len(sources))
        out.append(BlendedDataset([make(s, int(c)) if c else None for s, c in zip(sources, per)], index, sample))
    if out[0] is None:
        raise UserError(f"data.split = {d.split!r} leaves no documents for training")
    return out[0], out[1]


def check_vocab(source: IndexedDataset, tok: Any) -> None:
    """Refuse data whose ids do not fit the tokenizer, or that was not split into sentences."""
    n = len(source)
    if n and source.num_documents == n:
        raise UserError(f"{source.prefix} has one sequence per document: it was not split into sentences; "
                        "re-run `mtnlg preprocess --split-sentences` with the WordPiece tokenizer")
    if n and int(np.max(source.get(int(np.argmax(source.sizes))))) >= tok.vocab_size:
        raise UserError(f"{source.prefix} holds token ids >= the vocabulary of {tok.name} ({tok.vocab_size}); "
                        "preprocess it with the same WordPiece tokenizer")


def _split(source, fractions, split_id, tok, seq_length, seed, n, cache_dir, knobs) -> BertDataset:
    start, end = split_ranges(source.num_documents, fractions)[split_id]
    if end <= start:
        raise UserError(f"data.split gives no documents of {source.prefix} ({source.num_documents} documents) to "
                        f"{SPLIT_NAMES[split_id]}; use more data or change data.split")
    return BertDataset(source, (start, end), tok, seq_length, seed, n, _cache_dir(source, cache_dir),
                       SPLIT_NAMES[split_id], **knobs)


# --------------------------------------------------------------------------- the sample map


def build_sample_map(
    sizes: np.ndarray, doc_idx: np.ndarray, documents: tuple[int, int], max_tokens: int, short_seq_prob: float,
    min_sentences: int, seed: int, num_samples: int,
) -> np.ndarray:
    """int64[n, 3] rows (first sentence, end sentence, target length), whole epochs until n >= num_samples."""
    start, end = documents
    rows: list[np.ndarray] = []
    total, epoch = 0, 0
    while total < max(num_samples, 1):
        rng = np.random.RandomState([seed % 2**32, start % 2**32, epoch])
        epoch_rows: list[tuple[int, int, int]] = []

        def target(rng: np.random.RandomState = rng) -> int:
            return int(rng.randint(2, max_tokens + 1)) if rng.random_sample() < short_seq_prob else max_tokens

        for doc in range(start, end):
            a, b = int(doc_idx[doc]), int(doc_idx[doc + 1])
            if b - a < min_sentences:
                continue
            first, length, goal = a, 0, target()
            for i in range(a, b):
                length += int(sizes[i])
                count = i + 1 - first
                if (length >= goal or i + 1 == b) and count >= min_sentences:
                    epoch_rows.append((first, i + 1, goal))
                    first, length, goal = i + 1, 0, target()
        if not epoch_rows:
            raise UserError(f"no document in documents [{start}, {end}) has {min_sentences} or more sentences; "
                            "BERT needs multi-sentence documents (preprocess with --split-sentences)")
        block = np.asarray(epoch_rows, dtype=np.int64)
        rows.append(block[np.random.RandomState([seed % 2**32, start % 2**32, epoch, 1]).permutation(len(block))])
        total += len(block)
        epoch += 1
    return np.concatenate(rows)


# --------------------------------------------------------------------------- one dataset


class BertDataset:
    """BERT samples (see the module doc) over documents ``[start, end)`` of one sentence-split dataset."""

    def __init__(
        self, indexed: IndexedDataset, documents: tuple[int, int], tokenizer: Any, seq_length: int, seed: int,
        num_samples: int, cache_dir: str | Path, name: str = "train", mask_prob: float = 0.15,
        short_seq_prob: float = 0.1, max_ngram: int = 3, binary_head: bool = True,
    ) -> None:
        specials = 3 if binary_head else 2
        if seq_length < specials + 2:
            raise UserError(f"model.seq_length = {seq_length} is too short for BERT samples (needs >= {specials + 2})")
        self.indexed, self.documents, self.seq_length, self.seed = indexed, documents, seq_length, seed
        self.mask_prob, self.max_ngram, self.binary_head = float(mask_prob), int(max_ngram), bool(binary_head)
        self.cls, self.sep = tokenizer.cls_id, tokenizer.sep_id
        self.mask, self.pad = tokenizer.mask_id, tokenizer.pad_id
        self.continuation = tokenizer.continuation_mask()
        special = np.zeros(tokenizer.vocab_size, dtype=bool)
        special[list(tokenizer.special_ids)] = True
        self.special = special
        self.ordinary_ids = np.flatnonzero(~special)  # what a "random" replacement draws from
        max_tokens = seq_length - specials
        key = {
            "kind": "bert", "version": MAP_VERSION, "idx_sha1": file_digest(indexed.idx_path),
            "documents": list(documents), "max_tokens": max_tokens, "short_seq_prob": float(short_seq_prob),
            "min_sentences": 2 if binary_head else 1, "seed": seed, "num_samples": int(num_samples), "split": name,
        }
        build = lambda: {"samples": build_sample_map(  # noqa: E731
            indexed.sizes, indexed.doc_idx, documents, max_tokens, short_seq_prob, key["min_sentences"], seed,
            num_samples)}
        arrays = cached_arrays(Path(cache_dir), f"{Path(indexed.prefix).name}-bert-{name}", key, build,
                               lambda a: a["samples"].ndim == 2 and a["samples"].shape[1] == 3
                               and len(a["samples"]) >= max(num_samples, 1))
        self.samples = arrays["samples"]

    def __getstate__(self) -> dict:
        return _pickle_memmaps(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_unpickle_memmaps(state))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        first, end, target = (int(x) for x in self.samples[i])
        rng = np.random.RandomState([self.seed % 2**32, self.documents[0] % 2**32, i])
        sentences = [np.asarray(self.indexed.get(k), dtype=np.int64) for k in range(first, end)]
        return self.build_sample(sentences, target, rng)

    def build_sample(self, sentences: list[np.ndarray], target: int, rng: np.random.RandomState) -> dict:
        """One sample from a group of sentences (see the module doc)."""
        if self.binary_head:
            cut = int(rng.randint(1, len(sentences)))
            a, b = list(np.concatenate(sentences[:cut])), list(np.concatenate(sentences[cut:]))
            is_random = int(rng.random_sample() < 0.5)
            if is_random:
                a, b = b, a
        else:
            a, b, is_random = list(np.concatenate(sentences)), [], 0
        _truncate(a, b, target, rng)
        tokens = np.array([self.cls, *a, self.sep, *b] + ([self.sep] if self.binary_head else []), dtype=np.int64)
        types = np.zeros(len(tokens), dtype=np.int64)
        types[len(a) + 2:] = 1
        positions, _ = self.choose_masked(tokens, rng)
        labels = np.full(len(tokens), -1, dtype=np.int64)
        labels[positions] = tokens[positions]
        draw = rng.random_sample(len(positions))
        out_tokens = tokens.copy()
        out_tokens[positions[draw < 0.8]] = self.mask
        swap = positions[draw >= 0.9]
        out_tokens[swap] = self.ordinary_ids[rng.randint(0, len(self.ordinary_ids), len(swap))]
        n, pad = len(tokens), self.seq_length - len(tokens)
        assert pad >= 0, (n, self.seq_length)
        return {
            "tokens": np.concatenate([out_tokens, np.full(pad, self.pad, dtype=np.int64)]),
            "types": np.concatenate([types, np.zeros(pad, dtype=np.int64)]),
            "labels": np.concatenate([labels, np.full(pad, -1, dtype=np.int64)]),
            "loss_mask": np.concatenate([(labels >= 0).astype(np.int64), np.zeros(pad, dtype=np.int64)]),
            "padding_mask": np.concatenate([np.ones(n, dtype=np.int64), np.zeros(pad, dtype=np.int64)]),
            "is_random": np.array(is_random, dtype=np.int64),
        }

    def choose_masked(self, tokens: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, list[int]]:
        """(sorted positions to predict, the length in words of each n-gram chosen): whole-word n-grams."""
        words = _words(tokens, self.special, self.continuation)
        n_pieces = sum(len(x) for _, x in words)
        budget = max(1, int(round(self.mask_prob * n_pieces)))
        ns = np.arange(1, self.max_ngram + 1)
        p = (1.0 / ns) / (1.0 / ns).sum()
        covered: set[int] = set()
        chosen: list[int] = []
        for w in rng.permutation(len(words)):
            if len(covered) >= budget:
                break
            n = int(rng.choice(ns, p=p))
            while n > 0:
                span = words[w : w + n]
                if len(span) == n and len({seg for seg, _ in span}) == 1 and \
                        len(covered) + sum(len(x) for _, x in span) <= budget:
                    break
                n -= 1
            if n == 0:
                continue
            pieces = [k for _, x in words[w : w + n] for k in x]
            if covered.intersection(pieces):
                continue
            covered.update(pieces)
            chosen.append(n)
        return np.array(sorted(covered), dtype=np.int64), chosen


def _words(tokens: np.ndarray, special: np.ndarray, continuation: np.ndarray) -> list[tuple[int, list[int]]]:
    """(segment, positions) of each whole word: a piece plus the ``##`` pieces after it; specials split segments."""
    words: list[tuple[int, list[int]]] = []
    segment = 0
    for k, t in enumerate(tokens.tolist()):
        if special[t]:
            segment += 1
        elif continuation[t] and words and words[-1][0] == segment and words[-1][1][-1] == k - 1:
            words[-1][1].append(k)
        else:
            words.append((segment, [k]))
    return words


def _truncate(a: list, b: list, target: int, rng: np.random.RandomState) -> None:
    """Trim the longer of A and B, at a random end, until len(A) + len(B) <= target (both keep >= 1)."""
    while len(a) + len(b) > target:
        longer = a if len(a) > len(b) else b
        if rng.random_sample() < 0.5:
            del longer[0]
        else:
            longer.pop()
