"""A task's files as fine-tuning sample sources: what ``mtnlg finetune`` trains and evaluates on.

    data = load_task_data("mnli", "glue/MNLI/train.tsv", ["dev_matched.tsv", "dev_mismatched.tsv"],
                          tokenizer, seq_length=128)
    data.train[i]          # {"tokens", "types", "padding_mask", "label"} (np.int64) of training example i
    for v in data.valid:   # per file: its examples, its features (for predict_answers) and its source
        scores = data.task.metric(v.examples, predictions)

Classification labels are the task's own (mnli, qqp) or the training file's (classify); a validation label
outside them is refused. SQuAD sources give one sample per document-stride window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.errors import UserError
from mtnlg.tasks.common import Task
from mtnlg.tasks.registry import get_task

SAMPLE_KEYS = {
    "classify": ("tokens", "types", "padding_mask", "label"),
    "multiple_choice": ("tokens", "types", "padding_mask", "label"),
    "span": ("tokens", "types", "padding_mask", "start_position", "end_position"),
}


class TaskSource:
    """Features as a sample source: ``source[i]`` is a dict of sample i's arrays (the model's inputs and targets)."""

    def __init__(self, features: dict[str, np.ndarray], keys: Sequence[str]) -> None:
        self.features = {k: features[k] for k in keys}
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.features[self.keys[0]])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return {k: v[i] for k, v in self.features.items()}


@dataclass
class ValidSet:
    path: str
    examples: list
    features: dict[str, np.ndarray]
    source: TaskSource


@dataclass
class TaskData:
    task: Task
    labels: tuple[str, ...] | None  # classification: label index -> name
    train: TaskSource | None
    valid: list[ValidSet]


def load_task_data(
    name: str, train_path: str | Path | None, valid_paths: Sequence[str | Path], tokenizer: Any, seq_length: int,
    doc_stride: int = 128, labels: Sequence[str] | None = None,
) -> TaskData:
    """Read, check and featurise a task's training file and validation files (see the module doc)."""
    from mtnlg.data.wordpiece import WordPieceTokenizer

    task = get_task(name)
    if not isinstance(tokenizer, WordPieceTokenizer):
        raise UserError(f"--task {name} needs a WordPiece (BERT) tokenizer, but {tokenizer.name} is not one")
    kw = {"doc_stride": doc_stride} if task.kind == "span" else {}
    train_examples = task.read(train_path) if train_path is not None else None
    if train_examples is not None and not train_examples:
        raise UserError(f"{train_path}: no {name} examples")
    if labels is None and task.kind == "classify":
        if train_examples is None and task.labels is None:
            raise UserError(f"--task {name} takes its labels from the training data; give the training file")
        labels = task.label_names(train_examples or [])
    labels = tuple(labels) if labels is not None else None
    keys = SAMPLE_KEYS[task.kind]
    train = None
    if train_examples is not None:
        train = TaskSource(task.features(train_examples, tokenizer, seq_length, labels=labels, **kw), keys)
    valid = []
    for path in valid_paths:
        examples = task.read(path)
        if not examples:
            raise UserError(f"{path}: no {name} examples")
        if labels is not None:
            unknown = sorted({str(e.label) for e in examples} - set(labels))
            if unknown:
                raise UserError(f"{path}: label {unknown[0]!r} is not among the training labels "
                                f"({', '.join(labels)}); the validation file must use the same labels")
        feats = task.features(examples, tokenizer, seq_length, labels=labels, **kw)
        valid.append(ValidSet(str(path), examples, feats, TaskSource(feats, keys)))
    return TaskData(task, labels, train, valid)
