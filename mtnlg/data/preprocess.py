"""Tokenize documents into Megatron's indexed format, in K worker processes.

    stats = preprocess(["corpus.jsonl"], "text", tokenizer, "data/corpus", workers=2)

The main process cuts the inputs into ~256 KB chunks (see ``readers``); workers parse and
batch-encode whole chunks and return one token array per chunk; the main process writes
them in input order, so any number of workers gives byte-identical files. At most
``2 * workers`` chunks are in flight: memory does not grow with the corpus. Every document
ends with the tokenizer's end-of-document id (counted in its size); empty documents are
skipped and counted.

With ``split_sentences`` (BERT's data, Megatron's ``_sentence`` datasets) each sentence is one
sequence and the document index marks where each document's sentences start; no EOD is
appended (the document index is the boundary). Sentences come from ``mtnlg.data.sentences``
(rule-based, offline); a sentence with no tokens is dropped, a document with none is skipped.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.data import readers
from mtnlg.data.indexed import IndexedDatasetWriter, best_dtype, data_paths
from mtnlg.data.indexed import merge as _merge
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import UserError

CHUNK_BYTES = 1 << 18
LOG_EVERY_S = 5.0


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    sentences: int = 0  # with split_sentences: sequences written (one per sentence)
    bad_lines: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    workers: int = 1

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self, prefix: str) -> str:
        what = f"{self.sentences:,} sentences, {self.tokens:,} tokens" if self.sentences else \
            f"{self.tokens:,} tokens (incl. EOD)"
        return (
            f"wrote {prefix}.bin/.idx: {self.documents:,} documents, {what}, "
            f"{self.empty:,} empty documents skipped, {self.bad_lines:,} bad lines skipped; "
            f"{self.input_bytes / 1e6:.1f} MB in {self.seconds:.1f} s = {self.mb_per_s:.2f} MB/s "
            f"with {self.workers} worker{'s' if self.workers > 1 else ''}"
        )


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preprocess(
    inputs: list[str | Path],
    json_key: str,
    tokenizer: Tokenizer,
    output_prefix: str | Path,
    workers: int = 1,
    skip_bad_lines: bool = False,
    log: Callable[[str], None] | None = _stderr,
    chunk_bytes: int = CHUNK_BYTES,
    split_sentences: bool = False,
) -> PreprocessStats:
    """Write ``output_prefix.bin/.idx`` from .jsonl/.txt/.parquet/.arrow inputs or saved HF datasets; see the
    module doc."""
    if workers < 1:
        raise UserError(f"--workers {workers} must be >= 1")
    paths = readers.check_inputs(inputs, json_key)
    dtype = best_dtype(tokenizer.vocab_size)
    if np.iinfo(dtype).max < tokenizer.vocab_size - 1:  # pragma: no cover - best_dtype guarantees it
        raise AssertionError("token dtype too small")
    log = log or (lambda _msg: None)
    stats = PreprocessStats(workers=workers)
    progress = _Progress(sum(readers.input_bytes(p) for p in paths), log)
    t0 = time.perf_counter()
    chunks = itertools.chain.from_iterable(readers.iter_chunks(p, json_key, chunk_bytes) for p in paths)
    state = (tokenizer, json_key, skip_bad_lines, np.dtype(dtype).str, split_sentences)
    try:
        with (
            _single_threaded_tokenizers(),
            IndexedDatasetWriter(output_prefix, dtype) as writer,
            closing(_encoded(chunks, state, workers)) as results,
        ):
            for tokens, sizes, doc_ends, parsed, nbytes in results:
                if parsed.error is not None:
                    raise UserError(parsed.error)
                writer.add_sequences(tokens, sizes, doc_ends)
                stats.documents += len(doc_ends)
                stats.sentences += len(sizes) if split_sentences else 0
                stats.tokens += len(tokens)
                stats.empty += parsed.empty
                stats.bad_lines += parsed.bad
                stats.input_bytes += nbytes
                progress.update(stats, time.perf_counter() - t0)
            if stats.documents == 0:
                raise UserError(
                    f"no documents found in {', '.join(map(str, paths))} ({stats.empty} empty, "
                    f"{stats.bad_lines} bad lines); check the files and --json-key"
                )
            stats.seconds = time.perf_counter() - t0
    except OSError as e:  # disk full, unreadable input, ...: one line, and nothing left behind
        raise UserError(f"{e.filename or output_prefix}: {e.strerror or e}") from None
    log(f"preprocess: {stats.summary(str(data_paths(output_prefix)[0])[:-4])}")
    return stats


def merge(prefixes: list[str | Path], output_prefix: str | Path) -> None:
    """Concatenate preprocessed datasets into ``output_prefix`` (documents kept in order)."""
    _merge(prefixes, output_prefix)


# --------------------------------------------------------------------------- workers

_STATE: tuple[Any, ...] | None = None


def _init(state: tuple[Any, ...]) -> None:
    global _STATE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _STATE = state


def _encode(chunk: readers.Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, readers.Parsed, int]:
    """(tokens, sizes of the sequences, document end positions in sequences, parsed, input bytes)."""
    assert _STATE is not None
    tokenizer, json_key, skip_bad_lines, dtype, split_sentences = _STATE
    parsed = readers.parse_chunk(chunk, json_key, skip_bad_lines)
    if split_sentences:
        ids, doc_ends = _encode_sentences(tokenizer, parsed)
    else:
        ids = tokenizer.encode_batch(parsed.texts) if parsed.texts else []
        eod = tokenizer.eod_id
        for doc in ids:
            doc.append(eod)
        doc_ends = np.arange(1, len(ids) + 1, dtype=np.int64)
    sizes = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.dtype(dtype), count=int(sizes.sum()))
    parsed.texts = []  # not sent back
    return tokens, sizes, doc_ends, parsed, chunk.nbytes


def _encode_sentences(tokenizer: Tokenizer, parsed: readers.Parsed) -> tuple[list[list[int]], np.ndarray]:
    """One token list per non-empty sentence, and where each document with any ends (a count of sentences)."""
    from mtnlg.data.sentences import split_sentences

    per_doc = [split_sentences(text) for text in parsed.texts]
    flat = tokenizer.encode_batch([s for doc in per_doc for s in doc]) if any(per_doc) else []
    ids: list[list[int]] = []
    doc_ends: list[int] = []
    at = 0
    for doc in per_doc:
        kept = [x for x in flat[at : at + len(doc)] if x]
        at += len(doc)
        if not kept:
            parsed.empty += 1
            continue
        ids += kept
        doc_ends.append(len(ids))
    return ids, np.asarray(doc_ends, dtype=np.int64)


def _encoded(chunks: Iterator[readers.Chunk], state: tuple[Any, ...], workers: int) -> Iterator[Any]:
    """Encoded chunks in input order; at most 2 * workers chunks in flight."""
    if workers == 1:
        global _STATE
        saved, _STATE = _STATE, state
        try:
            yield from map(_encode, chunks)
        finally:
            _STATE = saved
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers, initializer=_init, initargs=(state,))
    try:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


@contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """K workers means K cores: keep HF tokenizers from adding threads (and fork warnings)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


class _Progress:
    """A log line every few seconds: bytes done, documents, tokens, MB/s and ETA."""

    def __init__(self, total_bytes: int, log: Callable[[str], None]) -> None:
        self.total = max(total_bytes, 1)
        self.log = log
        self.next_at = LOG_EVERY_S

    def update(self, s: PreprocessStats, elapsed: float) -> None:
        if elapsed < self.next_at:
            return
        self.next_at = elapsed + LOG_EVERY_S
        rate = s.input_bytes / max(elapsed, 1e-9)
        eta = max(self.total - s.input_bytes, 0) / max(rate, 1e-9)
        self.log(
            f"preprocess: {s.input_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
            f"({100 * s.input_bytes / self.total:.0f}%), {s.documents:,} docs, {s.tokens:,} tokens, "
            f"{rate / 1e6:.2f} MB/s, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
