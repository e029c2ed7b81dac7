"""The token sources a run trains and validates on: ``source[i]`` is global sample i (seq_length + 1 ids).

- ``data.synthetic``: a Markov chain (mtnlg.data.synthetic); validation walks the same chain;
- ``data.prefix`` / ``data.blend``: Megatron indexed datasets, split by documents;
- ``data.sft``: fine-tuning examples (``mtnlg.data.sft_dataset``), split by examples;
- nothing: the default corpus (Python standard-library docstrings), built on first use.
"""

from __future__ import annotations

import dataclasses

from mtnlg.config import RunConfig
from mtnlg.data.synthetic import MarkovSource
from mtnlg.errors import UserError


def data_tokenizer(cfg: RunConfig):
    """The run's tokenizer (None for synthetic data or pre-tokenized data without one)."""
    d = cfg.data
    if d.synthetic is not None:
        return None
    if (d.tokenizer is not None or d.vocab_file is not None) and d.prefix is None and d.blend is None \
            and d.sft is None:
        raise UserError("data.tokenizer is set but there is no data.prefix or data.blend to read with it "
                        "(the default corpus has its own tokenizer); add data.prefix")
    from mtnlg.model.registry import family

    own = family(cfg.model).tokenizer
    if own is not None:  # a family's own (BERT: WordPiece)
        return own(cfg)
    from mtnlg.data.gpt_dataset import build_tokenizer

    return build_tokenizer(cfg.data, getattr(cfg.model.family_knobs, "vocab_extra_ids", 0))  # T5's sentinels


def with_vocab(cfg: RunConfig, tokenizer) -> RunConfig:
    """Fill model.vocab_size from the tokenizer or synthetic source; check a stated one fits the data."""
    m, d = cfg.model, cfg.data
    source_vocab = tokenizer.vocab_size if tokenizer is not None else (
        d.synthetic.vocab_size if d.synthetic is not None else None)
    if source_vocab is None:
        return cfg
    if m.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=source_vocab))
    if m.vocab_size < source_vocab:
        what = "the tokenizer's" if tokenizer is not None else "data.synthetic.vocab_size"
        raise UserError(
            f"model.vocab_size = {m.vocab_size} is smaller than {what} {source_vocab}; remove model.vocab_size "
            "(it is taken from the data) or make it at least that"
        )
    return cfg


def build_sources(cfg: RunConfig):
    """(train, valid) sources of a resolved config; valid is None when the run has no validation data."""
    d, m, t = cfg.data, cfg.model, cfg.train
    from mtnlg.model.registry import family

    own = family(m).sources
    if own is not None:  # a family's own data (BERT, T5), synthetic data and fine-tuning (data.sft) included
        return own(cfg)
    if d.synthetic is not None:
        s = d.synthetic
        vocab = s.vocab_size or m.vocab_size  # with_vocab() checked it fits the model
        train = MarkovSource(vocab, s.branching, m.seq_length, s.seed, stream=0)
        valid = MarkovSource(vocab, s.branching, m.seq_length, s.seed, stream=1)  # same chain, other walks
        return train, valid
    if d.sft is not None:
        from mtnlg.training.sft_batches import sft_sources

        return sft_sources(cfg)
    from mtnlg.data.gpt_dataset import build_datasets

    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train, valid, _ = build_datasets(d, m.seq_length, t.seed, (t.iters * t.global_batch_size, n_valid, 0))
    if train is None:
        raise UserError(f"data.split = {d.split!r} leaves no documents for training")
    return train, valid
