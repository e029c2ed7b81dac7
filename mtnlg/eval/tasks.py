"""Zero-shot benchmark tasks over a ``Scorer`` (anything that gives next-token log-probabilities).

- ``perplexity`` (WikiText-style): whole documents, sliding window of the model's context with
  a stride; every token is scored once, with as much context as the window allows. Reports
  token perplexity, word perplexity (per whitespace word of the text) and bits per byte.
- ``cloze`` (LAMBADA-style): predict the last word of each passage. Accuracy is "greedy
  decoding reproduces the target" (every target token is the argmax); perplexity is
  exp(-mean log-likelihood of the target per example), as lm-evaluation-harness reports it.
- ``choice`` (HellaSwag/PIQA/ARC-style): pick the choice with the highest log-likelihood;
  ``acc_norm`` divides by the choice's length in bytes (lm-evaluation-harness' acc_norm).

JSONL inputs: ``{"text": ...}`` (perplexity, cloze), or ``{"context": ..., "target": ...}``
(cloze), ``{"context": ..., "choices": [...], "label": i}`` (choice).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mtnlg.data.readers import decode_line
from mtnlg.errors import UserError

TASKS = ("perplexity", "cloze", "choice")


class Scorer(Protocol):
    max_length: int

    def encode(self, text: str) -> list[int]: ...

    def score(self, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: log p(seq[i+1] | seq[:i+1]) and whether seq[i+1] is the argmax, for i < len-1."""
        ...


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file {p} not found")
    rows = []
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = decode_line(raw, f"{p}:{n}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{n}: malformed JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise UserError(f"{p}:{n}: expected a JSON object per line")
            rows.append(row)
    if not rows:
        raise UserError(f"{p} holds no examples")
    return rows


def _field(row: dict, key: str, where: str, kind: type = str):
    if key not in row or not isinstance(row[key], kind):
        raise UserError(f"{where}: needs a {kind.__name__} field '{key}'")
    return row[key]


# --------------------------------------------------------------------------- perplexity


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) windows over a document of n_tokens (+ a leading EOD).

    Sequence positions index a document prefixed with one EOD token, so the first real token
    is predicted from EOD. Window [begin, end) scores the targets at positions
    [first_scored, end), each target exactly once over all windows.
    """
    out, scored_to = [], 1
    total = n_tokens + 1
    while scored_to < total:
        end = min(total, scored_to + stride if out else max_length + 1)
        begin = max(0, end - max_length - 1)  # a window of max_length inputs predicts the next token each
        out.append((begin, end, scored_to))
        scored_to = end
    return out


def perplexity(scorer: Scorer, rows: list[dict], eod_id: int, stride: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    stride = stride or scorer.max_length // 2
    if not 0 < stride <= scorer.max_length:
        raise UserError(f"--stride {stride} must be between 1 and the model's context {scorer.max_length}")
    nll = tokens = words = nbytes = 0.0
    for i, row in enumerate(rows):
        text = _field(row, "text", f"example {i}")
        ids = [eod_id] + scorer.encode(text)
        seqs, spans = [], []
        for begin, end, first in windows(len(ids) - 1, scorer.max_length, stride):
            seqs.append(ids[begin:end])
            spans.append((first - begin - 1, end - begin - 1))  # indexes into the window's logprobs
        for (lp, _), (a, b) in zip(scorer.score(seqs), spans):
            nll -= float(lp[a:b].sum())
            tokens += b - a
        words += len(text.split())
        nbytes += len(text.encode("utf-8"))
        if progress:
            progress(i + 1, len(rows))
    return {
        "token_perplexity": math.exp(nll / tokens),
        "word_perplexity": math.exp(nll / max(words, 1)),
        "bits_per_byte": nll / max(nbytes, 1) / math.log(2),
        "nll_per_token": nll / tokens,
        "tokens": int(tokens),
        "words": int(words),
        "bytes": int(nbytes),
        "documents": len(rows),
    }


# --------------------------------------------------------------------------- cloze and choice


def continuation_requests(scorer: Scorer, pairs: Iterable[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) pairs: the pair is encoded as one text and split where
    the context's own tokens end, so the continuation is tokenised as the model would produce it
    after the context (falling back to separate encodings if a merge crosses the boundary)."""
    out = []
    for context, continuation in pairs:
        whole = scorer.encode(context + continuation)
        ctx = scorer.encode(context)
        if whole[: len(ctx)] != ctx:  # a merge across the boundary: fall back to separate encoding
            whole = ctx + scorer.encode(continuation)
        out.append((ctx, whole[len(ctx):]))
    return out


def loglikelihoods(scorer: Scorer, requests: list[tuple[list[int], list[int]]], eod_id: int,
                   batch_size: int = 8) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether it is the greedy continuation, per request."""
    results: list[tuple[float, bool]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        seqs, spans = [], []
        for ctx, cont in chunk:
            if not cont:
                raise UserError("an example has an empty continuation/target")
            seq = ([eod_id] if not ctx else ctx) + cont
            seq = seq[-(scorer.max_length + 1):]  # keep the continuation, truncate the context on the left
            seqs.append(seq)
            spans.append((len(seq) - 1 - len(cont), len(seq) - 1))
        for (lp, greedy), (a, b) in zip(scorer.score(seqs), spans):
            results.append((float(lp[a:b].sum()), bool(greedy[a:b].all())))
    return results


def cloze(scorer: Scorer, rows: list[dict], eod_id: int) -> dict[str, float]:
    pairs = []
    for i, row in enumerate(rows):
        if "context" in row:
            pairs.append((_field(row, "context", f"example {i}"), _field(row, "target", f"example {i}")))
        else:
            text = _field(row, "text", f"example {i}").rstrip()
            cut = text.rfind(" ")
            if cut <= 0:
                raise UserError(f"example {i}: a cloze text needs at least two words")
            pairs.append((text[:cut], text[cut:]))  # the target keeps its leading space
    res = loglikelihoods(scorer, continuation_requests(scorer, pairs), eod_id)
    lls = np.array([ll for ll, _ in res])
    return {"accuracy": float(np.mean([g for _, g in res])), "perplexity": float(np.exp(-lls.mean())),
            "examples": len(rows)}


def choice(scorer: Scorer, rows: list[dict], eod_id: int) -> dict[str, float]:
    pairs, owners, labels = [], [], []
    for i, row in enumerate(rows):
        where = f"example {i}"
        context = _field(row, "context", where)
        choices = _field(row, "choices", where, list)
        label = _field(row, "label", where, int)
        if not choices or not 0 <= label < len(choices) or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: needs string choices and a label in [0, {len(choices)})")
        for c in choices:
            pairs.append((context, " " + c.lstrip()))
            owners.append(i)
        labels.append(label)
    res = loglikelihoods(scorer, continuation_requests(scorer, pairs), eod_id)
    best: dict[int, list[tuple[float, float, int]]] = {}
    for k, ((ll, _), i) in enumerate(zip(res, owners)):
        best.setdefault(i, []).append((ll, ll / max(len(pairs[k][1].encode("utf-8")), 1), len(best.get(i, []))))
    acc = [max(best[i], key=lambda x: x[0])[2] == labels[i] for i in range(len(rows))]
    acc_norm = [max(best[i], key=lambda x: x[1])[2] == labels[i] for i in range(len(rows))]
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "examples": len(rows)}


def run_task(task: str, scorer: Scorer, rows: list[dict], eod_id: int, **kwargs) -> dict[str, float]:
    if task == "perplexity":
        return perplexity(scorer, rows, eod_id, **kwargs)
    if task == "cloze":
        return cloze(scorer, rows, eod_id)
    if task == "choice":
        return choice(scorer, rows, eod_id)
    raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
