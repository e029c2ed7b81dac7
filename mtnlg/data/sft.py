"""Supervised fine-tuning data: prompt/response or chat JSON lines -> token ids + a loss mask.

    stats = preprocess_sft(["train.jsonl"], tokenizer, "data/sft", max_length=512, overflow="truncate")

Each line is ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``.
A prompt/response example is ``encode(prompt) + encode(response) + [EOD]``; only the response and the EOD
count in the loss (mask 1). A chat is rendered by the tokenizer's chat template when it has one (each
assistant message's content counts, the template's headers do not), else by ``DEFAULT_TEMPLATE``:
``<|role|>\\n`` + content + ``\\n`` per message, an assistant's content followed by EOD instead of the newline.

Two Megatron indexed datasets are written with one sequence per example (``mtnlg.data.indexed``):
``PREFIX.bin/.idx`` the token ids (a plain Megatron dataset) and ``PREFIX.mask.bin/.idx`` the loss mask (uint8,
the same sizes). Examples longer than ``max_length`` tokens are truncated or dropped (``overflow``); a truncated
example with no response token left is dropped. Both are counted and reported.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtnlg.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype, data_paths
from mtnlg.data.readers import decode_line
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import UserError

MASK_SUFFIX = ".mask"
OVERFLOW = ("truncate", "drop")
ROLES = ("system", "user", "assistant")  # the chat roles an example may use (both templates know them)


def mask_prefix(prefix: str | Path) -> str:
    """The loss mask's prefix beside the tokens' ``PREFIX``."""
    return str(data_paths(prefix)[0])[:-4] + MASK_SUFFIX


@dataclass
class SFTStats:
    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long (overflow = drop), or no response token left after truncation

    def summary(self, prefix: str) -> str:
        return (f"wrote {prefix}.bin/.idx and {prefix}{MASK_SUFFIX}.bin/.idx: {self.examples:,} examples, "
                f"{self.tokens:,} tokens, {self.loss_tokens:,} in the loss; {self.truncated:,} truncated, "
                f"{self.dropped:,} dropped")


def render_prompt_response(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of one prompt/response example: the response and EOD are in the loss."""
    p, r = tokenizer.encode(prompt), tokenizer.encode(response) + [tokenizer.eod_id]
    return p + r, [0] * len(p) + [1] * len(r)


def render_chat(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a chat: the assistant messages' content is in the loss (see the module doc)."""
    hf = tokenizer.hf if tokenizer.engine == "hf" else None
    template = getattr(hf, "chat_template", None) if hf is not None else None
    if template:
        return _render_with_template(hf, messages)
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        head = tokenizer.encode(f"<|{m['role']}|>\n")
        ids += head
        mask += [0] * len(head)
        body = tokenizer.encode(m["content"])
        if m["role"] == "assistant":
            body += [tokenizer.eod_id]
            ids += body
            mask += [1] * len(body)
        else:
            body += tokenizer.encode("\n")
            ids += body
            mask += [0] * len(body)
    return ids, mask


def _render_with_template(hf, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render prefix by prefix: the text each message adds, its assistant header (the generation prompt) apart."""
    def render(msgs: list[dict], generation_prompt: bool = False) -> str:
        return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt) if msgs else ""

    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        pieces = []
        if m["role"] == "assistant":
            head = render(messages[:i], generation_prompt=True)
            pieces.append((head, 0))
        pieces.append((render(messages[: i + 1]), int(m["role"] == "assistant")))
        for text, counts in pieces:
            if not text.startswith(done):
                raise UserError("the tokenizer's chat template does not render a chat prefix by prefix; "
                                "give prompt/response examples instead")
            piece = hf.encode(text[len(done):], add_special_tokens=False)
            ids += piece
            mask += [counts] * len(piece)
            done = text
    return ids, mask


def parse_example(line: str, where: str) -> dict:
    """One JSON line as an example; a one-line UserError naming ``where`` (file:line) when it is not one."""
    try:
        ex = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(ex, dict):
        raise UserError(f"{where}: expected a JSON object with prompt/response or messages")
    if "messages" in ex:
        msgs = ex["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise UserError(f"{where}: messages must be a non-empty list of {{\"role\": str, \"content\": str}}")
        unknown = sorted({m["role"] for m in msgs} - set(ROLES))
        if unknown:
            raise UserError(f"{where}: unknown chat role {unknown[0]!r}; use one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: the chat has no assistant message, so nothing to learn from")
        return ex
    if not (isinstance(ex.get("prompt"), str) and isinstance(ex.get("response"), str)):
        raise UserError(f"{where}: expected string fields \"prompt\" and \"response\" (or a \"messages\" list)")
    if not ex["response"]:
        raise UserError(f"{where}: the response is empty, so nothing to learn from")
    return ex


def iter_examples(paths: list[Path]) -> Iterator[tuple[dict, str]]:
    for path in paths:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{path}:{n}"
                line = decode_line(raw, where)
                if line.strip():
                    yield parse_example(line, where), where



def render(tokenizer: Tokenizer, ex: dict) -> tuple[list[int], list[int]]:
    if "messages" in ex:
        return render_chat(tokenizer, ex["messages"])
    return render_prompt_response(tokenizer, ex["prompt"], ex["response"])


def preprocess_sft(inputs: list[str | Path], tokenizer: Tokenizer, output_prefix: str | Path,
                   max_length: int | None = None, overflow: str = "truncate",
                   log: Callable[[str], None] | None = None) -> SFTStats:
    """Write the token and loss-mask datasets of ``inputs`` (see the module doc); returns the counts."""
    if overflow not in OVERFLOW:
        raise UserError(f"--overflow {overflow} must be one of {', '.join(OVERFLOW)}")
    if max_length is not None and max_length < 2:
        raise UserError(f"--max-length {max_length} must be at least 2")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no input files given; pass --input FILE.jsonl [...]")
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p} not found; pass JSON lines with prompt/response or messages")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    stats = SFTStats()
    prefix = str(data_paths(output_prefix)[0])[:-4]
    try:
        with IndexedDatasetWriter(prefix, best_dtype(tokenizer.vocab_size)) as tokens, \
                IndexedDatasetWriter(mask_prefix(prefix), np.uint8) as masks:
            for ex, _where in iter_examples(paths):
                ids, mask = render(tokenizer, ex)
                if max_length is not None and len(ids) > max_length:
                    if overflow == "drop":
                        stats.dropped += 1
                        continue
                    ids, mask = ids[:max_length], mask[:max_length]
                    if not any(mask[1:]):  # the first token is never a label
                        stats.dropped += 1
                        continue
                    stats.truncated += 1
                size = np.array([len(ids)], dtype=np.int32)
                tokens.add_documents(np.asarray(ids), size)
                masks.add_documents(np.asarray(mask, dtype=np.uint8), size)
                stats.examples += 1
                stats.tokens += len(ids)
                stats.loss_tokens += sum(mask[1:])
            if stats.examples == 0:
                files = ", ".join(map(str, paths))
                if not stats.dropped:
                    raise UserError(f"{files} holds no examples; give JSON lines with prompt/response or messages")
                why = f"over --max-length {max_length}" if overflow == "drop" else \
                    f"no response token within --max-length {max_length}"
                raise UserError(f"no examples left in {files}: all {stats.dropped} dropped ({why}); "
                                "raise --max-length")
    except OSError as e:
        raise UserError(f"{e.filename or output_prefix}: {e.strerror or e}") from None
    log(f"preprocess --sft: {stats.summary(prefix)}")
    return stats


def load_sft(prefix: str | Path) -> tuple[IndexedDataset, IndexedDataset]:
    """(tokens, loss mask) of a ``preprocess --sft`` output, checked to belong together."""
    tokens = IndexedDataset(prefix)
    if not Path(mask_prefix(prefix) + ".idx").is_file():
        raise UserError(f"{mask_prefix(prefix)}.idx not found: data.sft.prefix must be written by "
                        "`mtnlg preprocess --sft` (token ids and a loss mask)")
    mask = IndexedDataset(mask_prefix(prefix))
    if len(mask) != len(tokens) or not np.array_equal(mask.sizes, tokens.sizes):
        raise UserError(f"{mask.prefix} does not match {tokens.prefix} (other example sizes); "
                        "re-run `mtnlg preprocess --sft`")
    return tokens, mask
