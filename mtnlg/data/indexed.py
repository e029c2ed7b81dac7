"""Megatron-LM's mmap indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), byte-exact.

``PREFIX.bin`` holds the tokens of every sequence back to back. ``PREFIX.idx``::

    b"MMIDIDX\\x00\\x00"        9 bytes magic
    <Q  version = 1
    <B  dtype code              1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    <Q  n                       number of sequences
    <Q  m                       length of the document index (documents + 1)
    int32[n]   sizes            tokens per sequence
    int64[n]   pointers         byte offset of each sequence in PREFIX.bin
    int64[m]   document index   sequence index where each document starts, then n

mtnlg writes one sequence per document. Files appear only when complete: everything is
written under temporary names, fsynced, then renamed (the old ``.idx`` is removed first,
so a reader never pairs a new ``.bin`` with an old ``.idx``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np

from mtnlg.errors import UserError
from mtnlg.files import fsync_path, temp_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_COPY_CHUNK = 1 << 22  # elements per streamed block when assembling the .idx


def best_dtype(vocab_size: int) -> type[np.number]:
    """Token dtype for a vocabulary (Megatron's rule: uint16 below 65500 tokens, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(PREFIX.bin, PREFIX.idx); a prefix given with a .bin/.idx suffix is accepted."""
    p = str(prefix)
    if p.endswith((".bin", ".idx")):
        p = p[:-4]
    return Path(p + ".bin"), Path(p + ".idx")


def exists(prefix: str | Path) -> bool:
    bin_path, idx_path = data_paths(prefix)
    return bin_path.is_file() and idx_path.is_file()


class IndexedDatasetWriter:
    """Streams sequences into ``PREFIX.bin``/``PREFIX.idx`` with memory independent of their number.

    Sizes and document boundaries are spooled to scratch files; ``finish`` assembles the
    ``.idx`` from them in blocks. Used as a context manager, an exception removes every
    temporary file and a clean exit calls ``finish``.
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number] | np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no indexed-dataset code")
        self.bin_path, self.idx_path = data_paths(prefix)
        self._tmp_bin = temp_path(self.bin_path)
        self._tmp_idx = temp_path(self.idx_path)
        self._tmp_sizes = temp_path(self.idx_path, "sizes")
        self._tmp_docs = temp_path(self.idx_path, "docs")
        opened = []
        try:
            self.bin_path.parent.mkdir(parents=True, exist_ok=True)
            for p in (self._tmp_bin, self._tmp_sizes, self._tmp_docs):
                opened.append(open(p, "wb"))
        except OSError as e:
            for f in opened:
                f.close()
                Path(f.name).unlink(missing_ok=True)
            raise UserError(f"cannot write {self.bin_path} ({e.strerror}); choose a writable output prefix") from None
        self._bin, self._sizes, self._docs = opened
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents of one sequence each: ``tokens`` is their concatenation."""
        sizes = np.asarray(sizes, dtype=np.int32)
        self.add_sequences(tokens, sizes, np.arange(1, len(sizes) + 1, dtype=np.int64))

    def add_sequences(self, tokens: np.ndarray, sizes: np.ndarray, doc_ends: np.ndarray) -> None:
        """Append sequences; ``doc_ends`` are document end positions relative to this batch."""
        sizes = np.asarray(sizes, dtype=np.int32)
        tokens = np.asarray(tokens)
        if int(sizes.sum(dtype=np.int64)) != tokens.size:
            raise ValueError(f"sizes sum to {int(sizes.sum())} but {tokens.size} tokens were given")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._sizes.write(sizes.tobytes())
        self._docs.write((np.asarray(doc_ends, dtype=np.int64) + self.num_sequences).tobytes())
        self.num_sequences += len(sizes)
        self.num_documents += len(doc_ends)
        self.num_tokens += tokens.size

    def finish(self) -> None:
        """Write the ``.idx``, fsync both files and move them into place."""
        if self._done:
            return
        for f in (self._bin, self._sizes, self._docs):
            f.flush()
            f.close()
        itemsize = self.dtype.itemsize
        with open(self._tmp_idx, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            out.write(struct.pack("<Q", self.num_sequences))
            out.write(struct.pack("<Q", self.num_documents + 1))
            _copy_file(self._tmp_sizes, out)
            offset = 0
            for block in _blocks(self._tmp_sizes, np.int32):
                ends = np.cumsum(block, dtype=np.int64) * itemsize + offset
                starts = np.concatenate(([offset], ends[:-1])) if len(ends) else ends
                out.write(starts.astype(np.int64).tobytes())
                offset = int(ends[-1]) if len(ends) else offset
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            _copy_file(self._tmp_docs, out)
            out.flush()
            os.fsync(out.fileno())
        fsync_path(self._tmp_bin)
        self._cleanup_scratch()
        if self.idx_path.exists():
            self.idx_path.unlink()
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        fsync_path(self.idx_path.parent)
        self._done = True

    def abort(self) -> None:
        """Remove every temporary file; the final names are left untouched."""
        for f in (self._bin, self._sizes, self._docs):
            f.close()
        self._cleanup_scratch()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)
        self._done = True

    def _cleanup_scratch(self) -> None:
        self._tmp_sizes.unlink(missing_ok=True)
        self._tmp_docs.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.finish()


def _blocks(path: Path, dtype: type[np.number]):
    with open(path, "rb") as f:
        while True:
            raw = f.read(_COPY_CHUNK * np.dtype(dtype).itemsize)
            if not raw:
                return
            yield np.frombuffer(raw, dtype=dtype)


def _copy_file(path: Path, out) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            out.write(block)


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx``; token reads are lazy (np.memmap).

    ``sizes``, ``pointers`` and ``doc_idx`` are views into the mapped ``.idx``. Every check
    that can fail on a truncated or foreign file is done here, with a one-line ``UserError``.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.bin_path, self.idx_path = data_paths(prefix)
        self.prefix = str(self.idx_path)[:-4]
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise UserError(
                    f"{p} not found; give the PREFIX of PREFIX.bin/PREFIX.idx written by `mtnlg preprocess`"
                )
        idx_size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
        where = str(self.idx_path)
        if head[: len(MAGIC)] != MAGIC:
            raise UserError(
                f"{where} is not a Megatron indexed-dataset index (bad magic {head[:9]!r}); "
                "point data.prefix at files written by `mtnlg preprocess` or Megatron's preprocess_data.py"
            )
        if len(head) < HEADER_SIZE:
            raise UserError(f"{where} is truncated ({idx_size} bytes, header needs {HEADER_SIZE}); re-run preprocess")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise UserError(f"{where}: unsupported index version {version} (expected {VERSION}); re-run preprocess")
        (code,) = struct.unpack("<B", head[17:18])
        if code not in DTYPE_CODES:
            raise UserError(f"{where}: unknown token dtype code {code} (expected 1-8); the file is corrupt or foreign")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, m = struct.unpack("<QQ", head[18:34])
        expected = HEADER_SIZE + n * 4 + n * 8 + m * 8
        # Megatron's multimodal variant appends one int8 mode per sequence.
        if idx_size not in (expected, expected + n) or m < 1:
            raise UserError(
                f"{where} is truncated or corrupt: {idx_size} bytes but its header ({n} sequences, "
                f"{max(m, 1) - 1} documents) needs {expected}; re-run preprocess"
            )
        mm = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        self._idx_mmap = mm
        off = HEADER_SIZE
        self.sizes = np.frombuffer(mm, dtype=np.int32, count=n, offset=off)
        off += n * 4
        self.pointers = np.frombuffer(mm, dtype=np.int64, count=n, offset=off)
        off += n * 8
        self.doc_idx = np.frombuffer(mm, dtype=np.int64, count=m, offset=off)
        self._check(n)
        self._bin = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if self.num_tokens else np.empty(0, self.dtype)

    def _check(self, n: int) -> None:
        itemsize = self.dtype.itemsize
        bin_size = self.bin_path.stat().st_size
        if n and (self.sizes.min() < 0):
            raise UserError(f"{self.idx_path} has negative sequence sizes; the file is corrupt, re-run preprocess")
        ends = np.cumsum(self.sizes, dtype=np.int64) * itemsize
        if n and (self.pointers[0] != 0 or not np.array_equal(self.pointers[1:], ends[:-1])):
            raise UserError(
                f"{self.idx_path} has inconsistent sequence pointers; the file is corrupt, re-run preprocess"
            )
        need = int(ends[-1]) if n else 0
        if bin_size != need:
            state = "truncated" if bin_size < need else "longer than its index"
            raise UserError(
                f"{self.bin_path} is {state}: {bin_size} bytes, but {self.idx_path.name} describes {need}; "
                "the pair is incomplete or mismatched, re-run preprocess"
            )
        d = self.doc_idx
        if d[0] != 0 or d[-1] != n or (len(d) > 1 and np.any(np.diff(d) < 0)):
            raise UserError(f"{self.idx_path} has an invalid document index; the file is corrupt, re-run preprocess")
        self.num_tokens = need // itemsize

    def __len__(self) -> int:
        """Number of sequences (mtnlg writes one per document)."""
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (a read-only view of the mmap)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}  # pickles as its path (e.g. to DataLoader workers), never its data

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])


def merge(prefixes: list[str | Path], output_prefix: str | Path) -> IndexedDataset:
    """Concatenate indexed datasets (same token dtype) into one, keeping document boundaries."""
    if not prefixes:
        raise UserError("merge needs at least one input prefix")
    sources = [IndexedDataset(p) for p in prefixes]
    dtypes = {str(s.dtype) for s in sources}
    if len(dtypes) > 1:
        names = ", ".join(f"{s.prefix} ({s.dtype})" for s in sources)
        raise UserError(
            f"cannot merge datasets with different token dtypes: {names}; re-run preprocess with one tokenizer"
        )
    out_bin, _ = data_paths(output_prefix)
    if any(s.bin_path.resolve() == out_bin.resolve() for s in sources):
        raise UserError(f"--output-prefix {output_prefix} is also an input; choose a new output prefix")
    step = 1 << 20
    with IndexedDatasetWriter(output_prefix, sources[0].dtype) as w:
        for s in sources:
            doc_ends = s.doc_idx[1:]
            if len(s) == 0:
                w.add_sequences(np.empty(0, s.dtype), np.empty(0, np.int32), np.zeros(len(doc_ends), np.int64))
            for a in range(0, len(s), step):
                b = min(a + step, len(s))
                lo = doc_ends >= a if a == 0 else doc_ends > a
                ends = doc_ends[lo & (doc_ends <= b)] - a
                first = int(s.pointers[a]) // s.dtype.itemsize
                tokens = s._bin[first : first + int(s.sizes[a:b].sum(dtype=np.int64))]
                w.add_sequences(np.asarray(tokens), s.sizes[a:b], ends)
    return IndexedDataset(output_prefix)
