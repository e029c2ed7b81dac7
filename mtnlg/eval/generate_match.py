"""``mtnlg evaluate --task generate-match``: exact match of greedy answers on held-out prompt/response pairs.

Each row is ``{"prompt", "response"}`` (optionally ``"kind"``, scored apart too) or a chat ``{"messages"}``
whose last message is the assistant's answer (the rest rendered with ``mtnlg.data.sft``'s default template, as
``preprocess --sft`` renders chats for tokenizers without a chat template). The model continues the prompt
greedily until end-of-document or ``max_new_tokens``; the answer matches when it equals the response after
stripping surrounding whitespace. Works with any model ``open_model`` gives a generator (mtnlg checkpoints of any
layout, run at pp = 1, and Hugging Face exports).
"""

from __future__ import annotations

from collections.abc import Callable

from mtnlg.errors import UserError


def prompt_and_answer(row: dict, where: str, encode: Callable[[str], list[int]], eod_id: int
                      ) -> tuple[list[int], str]:
    """(prompt token ids, expected answer) of one row; a chat's earlier turns are encoded piece by piece as
    ``mtnlg.data.sft.render_chat`` encodes them (an assistant turn ends with EOD), then the assistant header."""
    if "messages" in row:
        msgs = row["messages"]
        if not (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"):
            raise UserError(f"{where}: a chat row needs messages ending with the assistant's answer")
        ids: list[int] = []
        for m in msgs[:-1]:
            end = [eod_id] if m["role"] == "assistant" else encode("\n")
            ids += encode(f"<|{m['role']}|>\n") + encode(m["content"]) + end
        return ids + encode("<|assistant|>\n"), msgs[-1]["content"]
    if not (isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
        raise UserError(f"{where}: expected string fields \"prompt\" and \"response\" (or \"messages\")")
    return encode(row["prompt"]), row["response"]


def generate_match(generator, rows: list[dict], eod_id: int, max_new_tokens: int = 32, batch_size: int = 16,
                   progress: Callable[[int, int], None] | None = None, examples: int = 5) -> dict:
    """Exact-match accuracy of greedy answers (overall and per ``kind``), with the first ``examples`` answers."""
    if not rows:
        raise UserError("no rows to evaluate")
    pairs = [prompt_and_answer(r, f"row {i + 1}", generator.encode, eod_id) for i, r in enumerate(rows)]
    hits, shown = [], []
    for a in range(0, len(pairs), batch_size):
        chunk = pairs[a : a + batch_size]
        prompts = [p or [eod_id] for p, _ in chunk]
        outs = generator.generate_ids(prompts, max_new_tokens)
        for (prompt, answer), ids in zip(chunk, outs):
            got = generator.decode([t for t in ids if t != eod_id])
            hits.append(got.strip() == answer.strip())
            if len(shown) < examples:
                shown.append({"prompt": generator.decode(prompt), "expected": answer, "generated": got,
                              "match": hits[-1]})
        if progress:
            progress(len(hits), len(pairs))
    result = {"exact_match": sum(hits) / len(hits), "examples": len(hits), "matched": sum(hits)}
    kinds = sorted({r["kind"] for r in rows if isinstance(r.get("kind"), str)})
    if kinds:
        result["by_kind"] = {k: _rate([h for h, r in zip(hits, rows) if r.get("kind") == k]) for k in kinds}
    result["samples"] = shown
    return result


def _rate(hits: list[bool]) -> dict:
    return {"exact_match": sum(hits) / max(len(hits), 1), "examples": len(hits)}
