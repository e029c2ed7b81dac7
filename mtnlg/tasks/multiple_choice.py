"""Generic multiple choice: JSON lines ``{"context": ..., "question": ..., "choices": [...], "label": INDEX}``
(the same number of choices on every line); accuracy."""

from __future__ import annotations

from pathlib import Path

from mtnlg.errors import UserError
from mtnlg.tasks.common import ChoiceExample, Task, accuracy, read_jsonl


def read(path: str | Path) -> list[ChoiceExample]:
    out = []
    for n, obj in read_jsonl(path, ("context", "question", "choices", "label"), "multiple-choice"):
        choices, label = obj["choices"], obj["label"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{path}:{n}: choices must be a list of two or more strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(f"{path}:{n}: label {label!r} is not a choice index (0 to {len(choices) - 1})")
        if out and len(choices) != len(out[0].choices):
            raise UserError(f"{path}:{n}: {len(choices)} choices where the first line has {len(out[0].choices)}; "
                            "give every line the same number")
        out.append(ChoiceExample(f"{Path(path).name}:{n}", obj["context"], obj["question"], choices, label))
    return out


TASK = Task("multiple-choice", "multiple_choice", read, accuracy, None,
            "JSON lines: context, question, choices, label (index)")
