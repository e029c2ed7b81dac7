"""Per-document work, done by the workers (local processes or Ray tasks) on one shard at a time: the quality
filters (datatrove's Gopher quality, Gopher repetition and C4 filters, called on datatrove ``Document``s), the
13-gram benchmark check, the exact-duplicate hash of the normalised text and the MinHash signature of its word
5-gram shingles (datasketch). A shard's result is plain data; the driver decides duplicates across shards.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.curate.config import CurateConfig
from mtnlg.errors import UserError

_WORD = re.compile(r"\w+", re.UNICODE)
_C4_LINE_STATS = ("line-filter-too_long_word", "line-filter-no_terminal_punc", "line-filter-too_few_words",
                  "line-filter-javascript", "line-filter-policy")


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation (what shingles, n-grams and the exact hash are built from)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalised_hash(text: str) -> str:
    """Exact-duplicate key: 16 hex digits of the SHA-1 of the normalised words (case, punctuation and spacing
    differences do not count)."""
    return hashlib.sha1(" ".join(words(text)).encode("utf-8")).hexdigest()[:16]


def ngram_hashes(ws: list[str], n: int) -> set[int]:
    """64-bit hashes of the word n-grams of ``ws`` (none when it has fewer than n words)."""
    return {int.from_bytes(hashlib.blake2b(" ".join(ws[i:i + n]).encode("utf-8"), digest_size=8).digest(), "little")
            for i in range(len(ws) - n + 1)}


def shingles(ws: list[str], n: int) -> set[bytes]:
    """Word n-gram shingles (a shorter document is one shingle)."""
    if len(ws) < n:
        return {" ".join(ws).encode("utf-8")}
    return {" ".join(ws[i:i + n]).encode("utf-8") for i in range(len(ws) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact word n-gram Jaccard similarity of two texts (ground truth for the benchmark and tests)."""
    sa, sb = shingles(words(a), n), shingles(words(b), n)
    return len(sa & sb) / max(len(sa | sb), 1)


# --------------------------------------------------------------------------- benchmarks


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def benchmark_ngrams(benchmarks: dict[str, str], n: int) -> dict[int, str]:
    """n-gram hash -> benchmark name, from files in the formats mtnlg evaluates and fine-tunes on: JSONL (``text``;
    ``context`` + ``target``; ``context`` + ``choices`` + ``label``; any other fields) and, for a benchmark named
    after a downstream task (``mnli``, ``qqp``, ``race``, ``squad``; ``mnli-dev`` too), that task's own files (GLUE
    TSV, RACE JSON, SQuAD JSON: ``mtnlg.tasks``): every string of an example, and all of them joined (an n-gram may
    span the context and its answer)."""
    out: dict[int, str] = {}
    for name, path in benchmarks.items():
        p = Path(path)
        if not (p.is_file() or (p.is_dir() and _task_of(name))):
            raise UserError(f"benchmark '{name}': file {p} not found")
        found = 0
        for parts in _examples(name, p):
            for text in [*parts, " ".join(parts)]:
                for h in ngram_hashes(words(text), n):
                    out.setdefault(h, name)
            found += 1
        if not found:
            raise UserError(f"benchmark '{name}': {p} holds no examples")
    return out


def _task_of(name: str):
    """The downstream task a benchmark's name starts with (``squad``, ``mnli-dev``), None for a JSONL benchmark."""
    from mtnlg.tasks.registry import TASKS

    head = name.split("-", 1)[0].split("_", 1)[0]
    return TASKS.get(head) if head in ("mnli", "qqp", "race", "squad") else None


def _examples(name: str, p: Path):
    """The strings of each example of a benchmark file."""
    import dataclasses

    task = _task_of(name)
    if task is not None and p.suffix != ".jsonl":
        for example in task.read(p):
            yield _strings(dataclasses.asdict(example))
        return
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: malformed JSON ({e.msg}); benchmarks are JSONL files, or a "
                                "downstream task's own files under its name (mnli, qqp, race, squad)") from None
            yield _strings(row)


# --------------------------------------------------------------------------- a shard


@dataclass
class ShardResult:
    """What a worker returns for one shard. ``rows``: per document [id, chars, words, tokens, step, rule, detail,
    exact_hash, new_text, new_tokens] (step/rule/detail None when the document passed the per-document steps;
    new_text set when the C4 line rules changed it).
    ``signatures``: (docs, num_perm) uint32, zeros for removed documents."""

    rows: list[list[Any]]
    signatures: np.ndarray
    line_stats: dict[str, int] = field(default_factory=dict)
    host: str = ""


class Worker:
    """Everything a worker builds once (filters, MinHash permutations, benchmark n-grams), then applies to shards."""

    def __init__(self, cfg: CurateConfig, bench: dict[int, str], tokenizer_dir: str | None = None):
        from datasketch import MinHash

        self.cfg = cfg
        self.bench = bench
        self.filters = []
        if "quality" in cfg.steps:
            from mtnlg.curate.config import _filter_class

            self.filters = [(name, _filter_class(name)(**kw)) for name, kw in cfg.quality.items() if kw is not None]
        self.template = MinHash(num_perm=cfg.near.num_perm, seed=cfg.near.seed)
        self.tokenizer = None
        if tokenizer_dir:
            from mtnlg.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_dir)

    def signature(self, ws: list[str]) -> np.ndarray:
        from datasketch import MinHash

        m = MinHash(num_perm=self.cfg.near.num_perm, seed=self.cfg.near.seed, permutations=self.template.permutations,
                    scheme=self.template.scheme)
        m.update_batch(list(shingles(ws, self.cfg.near.ngram)))
        return m.hashvalues.astype(np.uint32)

    def run(self, docs: list[tuple[int, str]]) -> ShardResult:
        from datatrove.data import Document

        line_stats: dict[str, int] = {}
        rows, sigs = [], np.zeros((len(docs), self.cfg.near.num_perm), dtype=np.uint32)
        for i, (doc_id, text) in enumerate(docs):
            ws = words(text)
            tokens = len(self.tokenizer.encode(text)) if self.tokenizer is not None else None
            row = [doc_id, len(text), len(ws), tokens, None, None, None, None, None, None]
            doc = Document(text=text, id=str(doc_id))
            for name, filt in self.filters:
                before = doc.text
                counts = _line_counts(filt) if name == "c4" else {}
                verdict = filt.filter(doc)
                if name == "c4":  # the line counts of this document (datatrove's stats are cumulative)
                    for key, value in _line_counts(filt).items():
                        line_stats[key] = line_stats.get(key, 0) + value - counts.get(key, 0)
                if verdict is not True:
                    reason = verdict[1] if isinstance(verdict, tuple) else "rejected"
                    row[4:7] = ["quality", f"{name}:{reason}", None]
                    break
                if doc.text != before:
                    line_stats["chars-removed-by-lines"] = line_stats.get("chars-removed-by-lines", 0) + (
                        len(before) - len(doc.text))
            if row[4] is None and doc.text != text:
                row[8] = text = doc.text
                ws = words(text)
                row[9] = len(self.tokenizer.encode(text)) if self.tokenizer is not None else None
            if row[4] is None and self.bench:
                n = self.cfg.decontaminate.ngram
                hit = next((self.bench[h] for h in ngram_hashes(ws, n) if h in self.bench), None)
                if hit is not None:
                    row[4:7] = ["decontaminate", "ngram_overlap", hit]
            if row[4] is None:
                row[7] = normalised_hash(text)
                if "near" in self.cfg.steps:
                    sigs[i] = self.signature(ws)
            rows.append(row)
        return ShardResult(rows, sigs, line_stats, socket.gethostname())


def _line_counts(filt: Any) -> dict[str, int]:
    counts = filt.stats.stats  # datatrove's MetricStatsDict (a defaultdict: test membership, never index)
    return {key: int(counts[key].total) for key in _C4_LINE_STATS if key in counts}


_WORKERS: dict[str, Worker] = {}


def run_shard(key: str, state: tuple, docs: list[tuple[int, str]]) -> ShardResult:
    """A shard's result in this process; the ``Worker`` for ``key`` (a run's fingerprint) is built on first use."""
    if key not in _WORKERS:
        _WORKERS.clear()
        _WORKERS[key] = Worker(*state)
    return _WORKERS[key].run(docs)
