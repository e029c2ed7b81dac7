"""QQP (GLUE): a TSV with ``id qid1 qid2 question1 question2 is_duplicate``; 2 classes; accuracy and F1
(of the duplicate class, in percent)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtnlg.tasks.common import PairExample, Task, accuracy, check_label, read_tsv

LABELS = ("0", "1")
COLUMNS = ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")


def read(path: str | Path) -> list[PairExample]:
    return [PairExample(r["id"], r["question1"], r["question2"],
                        check_label(r["is_duplicate"], LABELS, f"{path}:{n}", "qqp"))
            for n, r in read_tsv(path, COLUMNS, "qqp")]


def metric(examples: list[PairExample], predictions: Sequence[str]) -> dict[str, float]:
    out = accuracy(examples, predictions)
    tp = sum(1 for e, p in zip(examples, predictions) if p == "1" and e.label == "1")
    fp = sum(1 for e, p in zip(examples, predictions) if p == "1" and e.label != "1")
    fn = sum(1 for e, p in zip(examples, predictions) if p != "1" and e.label == "1")
    out["f1"] = 100.0 * 2 * tp / max(2 * tp + fp + fn, 1)
    return out


TASK = Task("qqp", "classify", read, metric, LABELS, "GLUE QQP TSV: id qid1 qid2 question1 question2 is_duplicate")
