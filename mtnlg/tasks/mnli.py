"""MNLI (GLUE): ``train.tsv`` / ``dev_matched.tsv`` / ``dev_mismatched.tsv``, read by column name
(sentence1, sentence2, gold_label); 3 classes; accuracy."""

from __future__ import annotations

from pathlib import Path

from mtnlg.tasks.common import PairExample, Task, accuracy, check_label, read_tsv

LABELS = ("contradiction", "entailment", "neutral")
COLUMNS = ("sentence1", "sentence2", "gold_label")


def read(path: str | Path) -> list[PairExample]:
    return [PairExample(f"{Path(path).name}:{n}", r["sentence1"], r["sentence2"],
                        check_label(r["gold_label"], LABELS, f"{path}:{n}", "mnli"))
            for n, r in read_tsv(path, COLUMNS, "mnli")]


TASK = Task("mnli", "classify", read, accuracy, LABELS, "GLUE MNLI TSV: sentence1, sentence2, gold_label")
