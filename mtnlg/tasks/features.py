"""Examples -> fixed-length features for BERT (every array np.int64, padded to ``seq_length``).

- classify: ``[CLS] A [SEP] B [SEP]`` (the longer text trimmed at its end until both fit), label = the
  index of the example's label in the task's label names. Arrays tokens/types/padding_mask [N, L], label [N].
- multiple_choice: one such pair per choice, ``[CLS] context [SEP] question + choice [SEP]`` (a question
  with a blank ``_`` has the choice put in it, as in RACE's cloze questions), stacked: [N, C, L], label [N].
- span (SQuAD): ``[CLS] question [SEP] context window [SEP]``; a context longer than a window is cut
  into windows ``doc_stride`` tokens apart (windows overlap); start/end_position are the answer's
  token positions in the window, 0 ([CLS]) when the window holds no answer or the question has
  none. Arrays tokens/types/padding_mask [F, L], start_position/end_position/example_index [F] and
  char_start/char_end [F, L] (each context token's character span in its context, -1 elsewhere) to
  turn predicted positions back into answer text (``mtnlg.tasks.squad.predict_answers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtnlg.errors import UserError


def _pair(tokenizer: Any, a: list[int], b: list[int] | None, seq_length: int) -> tuple[list[int], list[int]]:
    """(tokens, types) of [CLS] a [SEP] (b [SEP]), trimming the longer of a and b at its end to fit."""
    a = list(a)
    b = None if b is None else list(b)
    room = seq_length - (3 if b is not None else 2)
    if room < 2:
        raise UserError(f"seq_length {seq_length} is too short for a [CLS] A [SEP] B [SEP] input")
    while len(a) + (len(b) if b is not None else 0) > room:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    tokens = [tokenizer.cls_id, *a, tokenizer.sep_id]
    types = [0] * len(tokens)
    if b is not None:
        tokens += [*b, tokenizer.sep_id]
        types += [1] * (len(b) + 1)
    return tokens, types


def _pad(rows: list[list[int]], seq_length: int, value: int) -> np.ndarray:
    out = np.full((len(rows), seq_length), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _stack(tokenizer: Any, pairs: list[tuple[list[int], list[int]]], seq_length: int) -> dict[str, np.ndarray]:
    return {
        "tokens": _pad([t for t, _ in pairs], seq_length, tokenizer.pad_id),
        "types": _pad([y for _, y in pairs], seq_length, 0),
        "padding_mask": _pad([[1] * len(t) for t, _ in pairs], seq_length, 0),
    }


def classify_features(examples: list, tokenizer: Any, seq_length: int, labels: Sequence[str]) -> dict[str, np.ndarray]:
    index = {name: i for i, name in enumerate(labels)}
    a = tokenizer.encode_batch([e.text_a for e in examples])
    has_b = [e.text_b is not None for e in examples]
    b_ids = iter(tokenizer.encode_batch([e.text_b for e in examples if e.text_b is not None]))
    pairs = [_pair(tokenizer, x, next(b_ids) if hb else None, seq_length) for x, hb in zip(a, has_b)]
    out = _stack(tokenizer, pairs, seq_length)
    try:
        out["label"] = np.array([index[str(e.label)] for e in examples], dtype=np.int64)
    except KeyError as e:
        raise UserError(f"label {e.args[0]!r} is not one of the task's labels ({', '.join(labels)})") from None
    return out


def choice_text(question: str, choice: str) -> str:
    return question.replace("_", choice, 1) if "_" in question else f"{question} {choice}".strip()


def choice_features(examples: list, tokenizer: Any, seq_length: int) -> dict[str, np.ndarray]:
    if not examples:
        raise UserError("no examples to make features of")
    n_choices = len(examples[0].choices)
    contexts = tokenizer.encode_batch([e.context for e in examples])
    rows: list[tuple[list[int], list[int]]] = []
    for e, ctx in zip(examples, contexts):
        if len(e.choices) != n_choices:
            raise UserError(f"example {e.guid} has {len(e.choices)} choices but {examples[0].guid} has {n_choices}; "
                            "stacked choices need the same number in every example")
        for b in tokenizer.encode_batch([choice_text(e.question, c) for c in e.choices]):
            rows.append(_pair(tokenizer, ctx, b, seq_length))
    flat = _stack(tokenizer, rows, seq_length)
    out = {k: v.reshape(len(examples), n_choices, seq_length) for k, v in flat.items()}
    out["label"] = np.array([e.label for e in examples], dtype=np.int64)
    return out


def span_features(examples: list, tokenizer: Any, seq_length: int, doc_stride: int | None = 128,
                  max_query_length: int = 64) -> dict[str, np.ndarray]:
    tokens, types, starts, ends, owners, cstarts, cends = [], [], [], [], [], [], []
    for k, e in enumerate(examples):
        q = tokenizer.encode(e.question)[:max_query_length]
        ids, offsets = tokenizer.encode_with_offsets(e.context)
        room = seq_length - len(q) - 3
        if room < 1:
            raise UserError(f"seq_length {seq_length} leaves no room for the context after question {e.qid}")
        if len(ids) > room and not doc_stride:
            raise UserError(f"the context of question {e.qid} is {len(ids)} tokens, longer than the {room} that "
                            f"seq_length {seq_length} leaves; give a document stride (e.g. --doc-stride 128) to "
                            "cut it into windows")
        span = _answer_tokens(e, offsets)
        step = min(doc_stride or room, room)
        first = 0
        while True:
            last = min(first + room, len(ids))
            toks = [tokenizer.cls_id, *q, tokenizer.sep_id, *ids[first:last], tokenizer.sep_id]
            shift = len(q) + 2 - first
            s = t = 0
            if span is not None and first <= span[0] and span[1] < last:
                s, t = span[0] + shift, span[1] + shift
            cs = [-1] * len(toks)
            ce = [-1] * len(toks)
            for j in range(first, last):
                cs[j + shift], ce[j + shift] = offsets[j]
            tokens.append(toks)
            types.append([0] * (len(q) + 2) + [1] * (last - first + 1))
            starts.append(s)
            ends.append(t)
            owners.append(k)
            cstarts.append(cs)
            cends.append(ce)
            if last >= len(ids):
                break
            first += step
    return {
        "tokens": _pad(tokens, seq_length, tokenizer.pad_id),
        "types": _pad(types, seq_length, 0),
        "padding_mask": _pad([[1] * len(t) for t in tokens], seq_length, 0),
        "start_position": np.array(starts, dtype=np.int64),
        "end_position": np.array(ends, dtype=np.int64),
        "example_index": np.array(owners, dtype=np.int64),
        "char_start": _pad(cstarts, seq_length, -1),
        "char_end": _pad(cends, seq_length, -1),
    }


def _answer_tokens(e: Any, offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """First and last context token of the example's first answer (None: no answer)."""
    if e.is_impossible or not e.answers:
        return None
    text, start = e.answers[0]
    end = start + len(text)
    inside = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    if not inside:
        return None
    return inside[0], inside[-1]
