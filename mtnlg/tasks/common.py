"""What the task readers share: examples, TSV/JSON reading with one-line errors, pair encoding, accuracy."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.errors import UserError


@dataclass
class PairExample:
    """A text (pair) with a label: mnli, qqp, classify."""

    guid: str
    text_a: str
    text_b: str | None
    label: Any


@dataclass
class ChoiceExample:
    """A context, a question and its choices, the right one's index: race, multiple-choice."""

    guid: str
    context: str
    question: str
    choices: list[str]
    label: int
    group: str | None = None  # race: "middle" / "high" from the path


@dataclass
class SpanExample:
    """A SQuAD question on a context: answers as (text, character start); none when impossible."""

    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)
    is_impossible: bool = False


@dataclass(frozen=True)
class Task:
    """One downstream task: how its files read, how examples become features, how predictions score."""

    name: str
    kind: str  # "classify" (pooled output -> classes), "multiple_choice" (one score per choice), "span" (start/end)
    read: Callable[[str | Path], list]
    metric: Callable[[list, Any], dict[str, float]]
    labels: tuple[str, ...] | None = None  # fixed label names; None: the distinct labels of the training data
    description: str = ""

    def label_names(self, train_examples: list) -> tuple[str, ...] | None:
        """The task's label names (classification tasks): fixed, or the sorted distinct labels of its training data."""
        if self.kind != "classify":
            return None
        if self.labels is not None:
            return self.labels
        return tuple(sorted({str(e.label) for e in train_examples}))

    def features(self, examples: list, tokenizer: Any, seq_length: int, labels: Sequence[str] | None = None,
                 **kwargs: Any) -> dict[str, np.ndarray]:
        """Fixed-length inputs (np.int64): tokens, types, padding_mask and targets (see mtnlg.tasks.features)."""
        from mtnlg.tasks import features

        if self.kind == "classify":
            return features.classify_features(examples, tokenizer, seq_length, labels or self.label_names(examples))
        if self.kind == "multiple_choice":
            return features.choice_features(examples, tokenizer, seq_length)
        return features.span_features(examples, tokenizer, seq_length, **kwargs)


def open_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} not found; pass the task's data file")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read it as UTF-8 text ({e})") from None


def read_tsv(path: str | Path, columns: Sequence[str], task: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: value}) of a TSV with a header row, by column name (GLUE files, no quoting)."""
    csv.field_size_limit(sys.maxsize)
    lines = open_text(path).splitlines()
    rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(rows, None)
    if header is None:
        raise UserError(f"{path}: empty file; a {task} TSV starts with a header row naming {', '.join(columns)}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path}: the header lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(it has {', '.join(header)}); a {task} TSV needs {', '.join(columns)}")
    where = [header.index(c) for c in columns]
    for n, row in enumerate(rows, 2):
        if not row:
            continue
        if len(row) < len(header):
            raise UserError(f"{path}:{n}: {len(row)} fields but the header has {len(header)}; fix or remove the line")
        yield n, {c: row[i] for c, i in zip(columns, where)}


def read_jsonl(path: str | Path, keys: Sequence[str], task: str, optional: Sequence[str] = ()) -> Iterator[
        tuple[int, dict[str, Any]]]:
    """(line number, object) of JSON lines, each an object with ``keys``."""
    for n, line in enumerate(open_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: not JSON ({e}); {task} data is one JSON object per line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}: expected a JSON object with {', '.join(keys)}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise UserError(f"{path}:{n}: missing {', '.join(missing)}; a {task} line needs {', '.join(keys)}"
                            + (f" (optional: {', '.join(optional)})" if optional else ""))
        yield n, obj


def check_label(value: Any, allowed: Sequence[str], where: str, task: str) -> str:
    label = str(value)
    if label not in allowed:
        raise UserError(f"{where}: label {value!r} is not one of {task}'s labels ({', '.join(allowed)})")
    return label


def accuracy(examples: list, predictions: Sequence[Any]) -> dict[str, float]:
    """Percent of examples whose prediction equals the label (labels as the features encode them)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    right = sum(int(p == e.label) for e, p in zip(examples, predictions))
    return {"accuracy": 100.0 * right / max(len(examples), 1), "total": float(len(examples))}
