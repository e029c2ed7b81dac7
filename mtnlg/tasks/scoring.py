"""A task head's logits -> predictions -> the task's metrics, shared by ``mtnlg finetune`` (after every epoch)
and ``mtnlg evaluate --task`` (with every example's prediction).

    logits                       # classify (N, classes); multiple choice (N, choices); span (windows, T, 2)
    preds = predictions(task, examples, features, logits, labels)
    metrics = task.metric(examples, preds)
    rows = per_example(task, examples, preds)    # [{"id", "prediction", "gold"}], in the examples' order

Classification predicts the label name of the largest logit (the task's labels, in class order); multiple choice
the index of the best-scoring choice; spans the best context span over a question's windows, or "" where the
[CLS] position scores higher (``mtnlg.tasks.squad.predict_answers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtnlg.tasks.common import Task
from mtnlg.tasks.squad import predict_answers


def predictions(task: Task, examples: list, features: dict[str, np.ndarray], logits: np.ndarray,
                labels: Sequence[str] | None = None) -> Any:
    """The task's predictions from its head's logits (see the module doc)."""
    logits = np.asarray(logits)
    if task.kind == "classify":
        if labels is None or logits.shape[-1] != len(labels):
            raise ValueError(f"{logits.shape[-1]} class logits for labels {labels}")
        return [labels[int(i)] for i in logits.argmax(-1)]
    if task.kind == "multiple_choice":
        return [int(i) for i in logits.argmax(-1)]
    return predict_answers(examples, features, logits[..., 0], logits[..., 1])


def gold(task: Task, example: Any) -> Any:
    if task.kind == "span":
        return [t for t, _ in example.answers]
    return example.label


def per_example(task: Task, examples: list, preds: Any) -> list[dict[str, Any]]:
    """One row per example: its id, the prediction and the gold label (answers for spans)."""
    if task.kind == "span":
        return [{"id": e.qid, "prediction": preds[e.qid], "gold": gold(task, e)} for e in examples]
    return [{"id": e.guid, "prediction": p, "gold": gold(task, e)} for e, p in zip(examples, preds)]


def score(task: Task, examples: list, features: dict[str, np.ndarray], logits: np.ndarray,
          labels: Sequence[str] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(the task's metrics, per-example rows) of a set from its head's logits."""
    preds = predictions(task, examples, features, logits, labels)
    return task.metric(examples, preds), per_example(task, examples, preds)
