"""RACE: one JSON object per file (the released ``RACE/{train,dev,test}/{middle,high}/*.txt``) or per
line, with ``article``, ``questions``, ``options`` (4 per question) and ``answers`` (A-D). A directory is
read recursively (sorted). Accuracy, and per middle / high when the path says which."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mtnlg.errors import UserError
from mtnlg.tasks.common import ChoiceExample, Task, accuracy, open_text

KEYS = ("article", "questions", "options", "answers")
LETTERS = "ABCD"


def read(path: str | Path) -> list[ChoiceExample]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"{p}: no files; point at RACE's train/dev/test folder or a JSON lines file")
    else:
        files = [p]
    out: list[ChoiceExample] = []
    for f in files:
        text = open_text(f)
        try:  # one object per file, else one per line
            objects = [(str(f), json.loads(text))]
        except ValueError:
            objects = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        objects.append((f"{f}:{n}", json.loads(line)))
                    except ValueError as e:
                        raise UserError(f"{f}:{n}: not JSON ({e}); RACE data is a JSON object per file or line") \
                            from None
        group = "middle" if "middle" in f.parts else "high" if "high" in f.parts else None
        for where, obj in objects:
            out += _examples(obj, where, group)
    return out


def _examples(obj: object, where: str, group: str | None) -> list[ChoiceExample]:
    if not isinstance(obj, dict) or any(k not in obj for k in KEYS):
        raise UserError(f"{where}: a RACE item is a JSON object with {', '.join(KEYS)}")
    qs, opts, answers = obj["questions"], obj["options"], obj["answers"]
    if not (len(qs) == len(opts) == len(answers)):
        raise UserError(f"{where}: {len(qs)} questions, {len(opts)} option lists and {len(answers)} answers; "
                        "they go one per question")
    out = []
    for k, (q, o, a) in enumerate(zip(qs, opts, answers)):
        if a not in LETTERS or len(a) != 1:
            raise UserError(f"{where}: question {k + 1}'s answer {a!r} is not one of A, B, C, D")
        if len(o) != 4:
            raise UserError(f"{where}: question {k + 1} has {len(o)} options; RACE has 4 (A-D)")
        if LETTERS.index(a) >= len(o):
            raise UserError(f"{where}: question {k + 1}'s answer {a} has no option")
        out.append(ChoiceExample(f"{obj.get('id', where)}-{k}", obj["article"], q, list(o), LETTERS.index(a), group))
    return out


def metric(examples: list[ChoiceExample], predictions: Sequence[int]) -> dict[str, float]:
    out = accuracy(examples, predictions)
    for g in ("middle", "high"):
        pairs = [(e, p) for e, p in zip(examples, predictions) if e.group == g]
        if pairs:
            out[f"{g}_accuracy"] = 100.0 * sum(int(e.label == p) for e, p in pairs) / len(pairs)
            out[f"{g}_total"] = float(len(pairs))
    return out


TASK = Task("race", "multiple_choice", read, metric, None, "RACE JSON: article, questions, options, answers A-D")
