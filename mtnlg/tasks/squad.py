"""SQuAD v1.1 and v2.0: the official JSON (``data[].paragraphs[].qas[]``; v2 by ``is_impossible``), the
answer span as start/end token positions in document-stride windows, and the official metric.

Metric (the official evaluation script's logic, in percent): answers are normalised (lower-cased,
punctuation removed, the articles a/an/the removed, whitespace collapsed); exact match and token
F1 take the maximum over the gold answers; a question without answers has the gold answer "" (a
prediction scores only when it is empty too). v2 also reports HasAns_* and NoAns_*.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mtnlg.errors import UserError
from mtnlg.tasks.common import SpanExample, Task, open_text


def read(path: str | Path) -> list[SpanExample]:
    try:
        doc = json.loads(open_text(path))
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e}); pass a SQuAD v1.1/v2.0 file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f"{path}: a SQuAD file is a JSON object with a data list (data[].paragraphs[].qas[])")
    out = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            context = para["context"]
            for qa in para.get("qas", []):
                impossible = bool(qa.get("is_impossible", False))
                answers = []
                for a in qa.get("answers", []):
                    text, start = a["text"], int(a["answer_start"])
                    if context[start : start + len(text)] != text:
                        raise UserError(
                            f"{path}: question {qa['id']}: answer_start {start} does not match its text {text!r} "
                            f"(the context has {context[start : start + len(text)]!r} there); fix answer_start")
                    answers.append((text, start))
                if not impossible and not answers:
                    raise UserError(f"{path}: question {qa['id']} has no answers and is not marked is_impossible")
                out.append(SpanExample(qa["id"], qa["question"], context, answers, impossible))
    return out


# --------------------------------------------------------------------------- the official metric


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:  # a no-answer: right only when both are empty
        return float(g == p)
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def metric(examples: list[SpanExample], predictions: Mapping[str, str]) -> dict[str, float]:
    """exact / f1 (percent) over the examples, max over gold answers; with v2 data (any is_impossible) also
    HasAns_* / NoAns_* for the questions with / without answers."""
    missing = [e.qid for e in examples if e.qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} questions, e.g. {missing[0]}")
    em, f1, has = [], [], []
    for e in examples:
        golds = [t for t, _ in e.answers if normalize_answer(t)] or [""]
        pred = predictions[e.qid]
        em.append(max(exact_match(g, pred) for g in golds))
        f1.append(max(f1_score(g, pred) for g in golds))
        has.append(bool(e.answers) and not e.is_impossible)
    n = len(examples)
    out = {"exact": 100.0 * sum(em) / max(n, 1), "f1": 100.0 * sum(f1) / max(n, 1), "total": float(n)}
    v2 = any(e.is_impossible for e in examples)
    for name, keep in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, h in enumerate(has) if h == keep]
        if v2 and idx:
            out[f"{name}_exact"] = 100.0 * sum(em[i] for i in idx) / len(idx)
            out[f"{name}_f1"] = 100.0 * sum(f1[i] for i in idx) / len(idx)
            out[f"{name}_total"] = float(len(idx))
    return out


def predict_answers(examples: list[SpanExample], features: dict[str, np.ndarray], start_logits: np.ndarray,
                    end_logits: np.ndarray, max_answer_tokens: int = 30) -> dict[str, str]:
    """qid -> answer text: over each question's windows, the best context span (start <= end, at most
    ``max_answer_tokens``); "" when the [CLS] score (start + end at 0) beats it (v2's no-answer)."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f in range(len(features["tokens"])):
        k = int(features["example_index"][f])
        cs, ce = features["char_start"][f], features["char_end"][f]
        s_log, e_log = np.asarray(start_logits[f], dtype=np.float64), np.asarray(end_logits[f], dtype=np.float64)
        null[k] = min(null.get(k, np.inf), s_log[0] + e_log[0])
        ctx = np.flatnonzero(cs >= 0)
        if not len(ctx):
            continue
        s_best = ctx[np.argsort(-s_log[ctx])[:20]]
        e_best = ctx[np.argsort(-e_log[ctx])[:20]]
        for s in s_best:
            for e in e_best:
                if e < s or e - s + 1 > max_answer_tokens:
                    continue
                score = s_log[s] + e_log[e]
                if k not in best or score > best[k][0]:
                    best[k] = (score, examples[k].context[int(cs[s]) : int(ce[e])])
    out = {}
    for k, ex in enumerate(examples):
        score, text = best.get(k, (-np.inf, ""))
        out[ex.qid] = "" if null.get(k, np.inf) > score else text
    return out


TASK = Task("squad", "span", read, metric, None, "SQuAD v1.1/v2.0 JSON (v2 by is_impossible)")
