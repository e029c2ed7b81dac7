"""Fine-tuning samples from a ``preprocess --sft`` dataset, one example per row or several packed in one.

    ds = SFTDataset("data/sft", seq_length=128, seed=1, packing=True, num_samples=1000, examples=range(0, 900))
    ds[i]   # SFTSample: input_ids, labels, loss_mask, segment_ids, each (seq_length,)

An example of n tokens gives n - 1 (input, label) pairs, shifted inside the example, so no example predicts the
next one's first token. Every epoch takes the examples in a fresh order (``seed`` + epoch) and fills rows in
that order: without packing one example per row, with packing as many whole examples as fit (an example that
does not fit starts the next row). Examples longer than ``seq_length + 1`` tokens are cut. The rest of a row is
padding: its own segment, out of the loss. ``segment_ids`` numbers the examples of a row 0, 1, ...
(``mtnlg.model.documents``). Every rank computes the same rows, so sample i is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtnlg.data.sft import load_sft


@dataclass
class SFTSample:
    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray


class SFTDataset:
    sft = True  # the training loop builds fine-tuning batches from it (mtnlg.training.sft_batches)

    def __init__(self, prefix: str | Path, seq_length: int, seed: int, packing: bool, num_samples: int,
                 examples: range | None = None, pad_id: int = 0):
        self.tokens, self.mask = load_sft(prefix)
        self.seq_length, self.packing, self.pad_id = seq_length, packing, pad_id
        self.examples = np.arange(len(self.tokens))[examples if examples is not None else slice(None)]
        if len(self.examples) == 0:
            raise ValueError("an SFTDataset needs at least one example")
        self.pairs = np.minimum(self.tokens.sizes[self.examples].astype(np.int64), seq_length + 1) - 1
        rows: list[list[int]] = []
        epoch = 0
        while len(rows) < num_samples:
            order = self.examples[np.random.RandomState(seed + epoch).permutation(len(self.examples))]
            rows += self._pack(order)
            epoch += 1
        self.rows = rows[:num_samples] if num_samples else rows
        self.epochs = epoch

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        where = {int(e): i for i, e in enumerate(self.examples)}
        rows, row, fill = [], [], 0
        for e in order.tolist():
            n = int(self.pairs[where[e]])
            if row and (not self.packing or fill + n > self.seq_length):
                rows.append(row)
                row, fill = [], 0
            row.append(e)
            fill += n
        rows.append(row)
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> SFTSample:
        T = self.seq_length
        ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, self.pad_id, dtype=np.int64)
        mask = np.zeros(T, dtype=np.float32)
        seg = np.zeros(T, dtype=np.int64)
        at = 0
        for s, e in enumerate(self.rows[i]):
            n = min(int(self.tokens.sizes[e]), T + 1 - at)
            tok = np.asarray(self.tokens.get(e, 0, n), dtype=np.int64)
            ids[at : at + n - 1] = tok[:-1]
            labels[at : at + n - 1] = tok[1:]
            mask[at : at + n - 1] = self.mask.get(e, 1, n - 1)
            seg[at : at + n - 1] = s
            at += n - 1
        seg[at:] = len(self.rows[i])  # padding: a segment of its own
        return SFTSample(ids, labels, mask, seg)

    def loss_tokens(self, i: int) -> int:
        """Tokens of sample i in the loss (without building the sample)."""
        T, at, total = self.seq_length, 0, 0
        for e in self.rows[i]:
            n = min(int(self.tokens.sizes[e]), T + 1 - at)
            total += int(np.count_nonzero(self.mask.get(e, 1, n - 1)))
            at += n - 1
        return total
