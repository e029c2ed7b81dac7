"""The token sources a run trains and validates on: ``source[i]`` is global sample i (seq_length + 1 ids)."""

from __future__ import annotations

from mtnlg.config import RunConfig
from mtnlg.data.synthetic import MarkovSource
from mtnlg.errors import UserError
from mtnlg.parallel import ParallelState


def build_sources(cfg: RunConfig, ps: ParallelState):
    """(train, valid) sources; valid is None when the run has no validation data."""
    d, m = cfg.data, cfg.model
    if d.synthetic is not None:
        s = d.synthetic
        vocab = s.vocab_size or m.vocab_size
        if vocab > m.vocab_size:
            raise UserError(f"data.synthetic.vocab_size = {vocab} exceeds model.vocab_size = {m.vocab_size}")
        train = MarkovSource(vocab, s.branching, m.seq_length, s.seed, stream=0)
        valid = MarkovSource(vocab, s.branching, m.seq_length, s.seed, stream=1)  # same chain, other walks
        return train, valid
    raise UserError("no data configured: set data.synthetic, data.prefix or data.blend")
