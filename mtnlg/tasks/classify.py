"""Generic classification: JSON lines ``{"text_a": ..., "text_b": ... (optional), "label": ...}``; the labels
are the distinct labels of the training file (a validation label outside them is an error); accuracy."""

from __future__ import annotations

from pathlib import Path

from mtnlg.errors import UserError
from mtnlg.tasks.common import PairExample, Task, accuracy, read_jsonl


def read(path: str | Path) -> list[PairExample]:
    out = []
    for n, obj in read_jsonl(path, ("text_a", "label"), "classify", optional=("text_b",)):
        if not isinstance(obj["text_a"], str) or not isinstance(obj.get("text_b", ""), (str, type(None))):
            raise UserError(f"{path}:{n}: text_a and text_b must be strings")
        if not isinstance(obj["label"], (str, int)) or isinstance(obj["label"], bool):
            raise UserError(f"{path}:{n}: label {obj['label']!r} must be a string or an integer")
        out.append(PairExample(f"{Path(path).name}:{n}", obj["text_a"], obj.get("text_b"), str(obj["label"])))
    return out


TASK = Task("classify", "classify", read, accuracy, None, "JSON lines: text_a, text_b (optional), label")
