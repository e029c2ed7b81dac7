"""Streaming document sources: JSON lines, plain text, parquet and Hugging Face datasets, read in bounded chunks.

Formats, by file name:

- ``.jsonl`` / ``.json`` / ``.ndjson`` (optionally ``.gz``): one JSON object per line, the
  document is ``obj[json_key]``. Blank lines are ignored.
- ``.txt`` / ``.text`` (optionally ``.gz``): documents are separated by one or more blank
  (empty or whitespace-only) lines; a document keeps its inner newlines. One document per
  line therefore needs a blank line between lines; use JSON lines for anything else.
- ``.parquet``: the string column ``json_key``, streamed in record batches by pyarrow.
- a directory saved by ``datasets`` (``Dataset.save_to_disk``), or one ``.arrow`` file of such a
  dataset (or of the ``datasets`` cache): the string column ``json_key``, read with ``datasets``
  (``load_from_disk`` / ``Dataset.from_file``). The Arrow data is memory-mapped, not loaded, and
  iterated in batches, so memory stays bounded as with ``streaming=True``, but the row count is known
  (progress, row numbers) and it reads much faster than ``to_iterable_dataset()`` (benchmarks/README.md).

JSON lines, text and parquet keep their own readers: workers parse JSON in parallel and name
the bad line, which ``datasets``' JSON loader (one process, one error for a whole block) would
not; pyarrow's parquet batches are what ``datasets`` itself reads, without its per-batch overhead.

The main process only cuts inputs into chunks (lists of raw lines or column values); workers
parse them (``parse_chunk``), so JSON decoding runs in parallel too. Errors name ``FILE:LINE``
(the row number for parquet and datasets).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtnlg.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")


@dataclass
class Chunk:
    """A slice of one input file: raw lines (jsonl/txt) or column values (parquet)."""

    path: str
    kind: str  # "jsonl" | "txt" | "rows" (column values: parquet, datasets)
    first: int  # 1-based line (row) number of items[0]
    items: list[Any]
    nbytes: int  # input bytes this chunk accounts for (progress / MB/s)


@dataclass
class Parsed:
    texts: list[str] = field(default_factory=list)
    empty: int = 0
    bad: int = 0
    error: str | None = None  # the first bad line's message when not skipping


def decode_line(raw: bytes, where: str) -> str:
    """A line of a text file as UTF-8, or a one-line UserError naming ``where`` (file:line) and the bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None


def input_format(path: str | Path) -> str:
    """"jsonl", "txt", "parquet" or "datasets" (a saved dataset directory or an ``.arrow`` file)."""
    if Path(path).is_dir():
        if (Path(path) / "state.json").is_file() or (Path(path) / "dataset_dict.json").is_file():
            return "datasets"
        raise UserError(f"{path} is a directory but not a saved Hugging Face dataset (no state.json); "
                        "pass files, or a directory written by Dataset.save_to_disk")
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if not str(path).lower().endswith(".gz"):
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith(".arrow"):
            return "datasets"
    raise UserError(f"{path}: unknown input format; use .jsonl (one JSON object per line), .txt, .parquet, "
                    ".arrow or a saved Hugging Face dataset directory")


def check_inputs(paths: Iterable[str | Path], json_key: str) -> list[Path]:
    """Every input exists and has a known format (parquet, datasets: has a string column ``json_key``)."""
    out = [Path(p) for p in paths]
    if not out:
        raise UserError("no input files given; pass --input FILE.jsonl [...]")
    for p in out:
        if not p.exists():
            raise UserError(f"input file {p} not found")
        kind = input_format(p)
        if kind == "parquet":
            _parquet_file(p, json_key)
        elif kind == "datasets":
            _hf_dataset(p, json_key)
    return out


def input_bytes(path: Path) -> int:
    """The bytes an input accounts for in progress and MB/s (a dataset directory: its files)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def iter_chunks(path: Path, json_key: str, chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    kind = input_format(path)
    if kind == "parquet":
        yield from _parquet_chunks(path, json_key, chunk_bytes)
        return
    if kind == "datasets":
        yield from _hf_chunks(path, json_key, chunk_bytes)
        return
    line, done = 1, 0
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if str(path).lower().endswith(".gz") else raw
        carry: list[bytes] = []
        while True:
            lines = f.readlines(chunk_bytes)
            if kind == "txt" and lines:
                # Cut after the last blank line so that no document spans two chunks.
                buf = carry + lines
                cut = next((i for i in range(len(buf) - 1, -1, -1) if not buf[i].strip()), None)
                if cut is None:
                    carry = buf
                    continue
                lines, carry = buf[: cut + 1], buf[cut + 1 :]
            elif kind == "txt":
                lines, carry = carry, []
            if not lines:
                return
            pos = raw.tell()  # file bytes consumed (compressed bytes for .gz)
            yield Chunk(str(path), kind, line, lines, pos - done)
            line, done = line + len(lines), pos


def _parquet_file(path: Path, json_key: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    _check_string_column(path, pf.schema_arrow, json_key)
    return pf


def _check_string_column(path: Path, schema: Any, json_key: str) -> None:
    """``schema`` (a pyarrow schema) has a string column ``json_key``; else a one-line UserError."""
    import pyarrow as pa

    if json_key not in schema.names:
        raise UserError(f"{path}: no column '{json_key}' (columns: {', '.join(schema.names)}); pass --json-key COLUMN")
    col_type = schema.field(json_key).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise UserError(f"{path}: column '{json_key}' has type {col_type}, expected strings; pass --json-key COLUMN")


def _parquet_chunks(path: Path, json_key: str, chunk_bytes: int) -> Iterator[Chunk]:
    pf = _parquet_file(path, json_key)
    meta = pf.metadata
    rows = max(meta.num_rows, 1)
    col = pf.schema_arrow.names.index(json_key)
    text_bytes = sum(meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups))
    batch_rows = max(1, int(chunk_bytes // max(text_bytes / rows, 1)))
    batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=batch_rows, columns=[json_key]))
    yield from _row_chunks(path, batches, meta.num_rows)


def _hf_dataset(path: Path, json_key: str) -> Any:
    """The ``datasets.Dataset`` of a saved directory or an ``.arrow`` file, memory-mapped, checked for a
    string column ``json_key``."""
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
    except (OSError, ValueError, pa.ArrowException) as e:  # FileNotFoundError is an OSError
        raise UserError(f"{path}: not a readable Hugging Face dataset ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{path} holds the splits {', '.join(ds)}; pass one, e.g. --input {path / next(iter(ds))}")
    _check_string_column(path, ds.data.schema, json_key)
    return ds


def _hf_chunks(path: Path, json_key: str, chunk_bytes: int) -> Iterator[Chunk]:
    ds = _hf_dataset(path, json_key).select_columns([json_key])
    rows = len(ds)
    batch_rows = max(1, chunk_bytes * rows // max(input_bytes(path), 1))
    yield from _row_chunks(path, (b[json_key] for b in ds.iter(batch_size=batch_rows)), rows)


def _row_chunks(path: Path, batches: Iterable[list[Any]], rows: int) -> Iterator[Chunk]:
    """Chunks of column values; each accounts for its rows' share of the input's bytes."""
    total, done = input_bytes(path), 0
    for values in batches:
        share = total * (done + len(values)) // max(rows, 1) - total * done // max(rows, 1)
        yield Chunk(str(path), "rows", done + 1, values, share)
        done += len(values)


# --------------------------------------------------------------------------- parsing


def parse_chunk(chunk: Chunk, json_key: str, skip_bad_lines: bool) -> Parsed:
    """Documents of a chunk; bad lines are counted (skip) or reported as the first error."""
    if chunk.kind == "txt":
        return _parse_text(chunk, skip_bad_lines)
    out = Parsed()
    for i, item in enumerate(chunk.items):
        if chunk.kind == "jsonl":
            if not item.strip():
                continue
            text, problem = _json_document(item, json_key)
        else:
            text, problem = (item, None) if isinstance(item, str) else (None, f"'{json_key}' is null")
        if problem is not None:
            out.bad += 1
            if not skip_bad_lines:
                out.error = f"{chunk.path}:{chunk.first + i}: {problem}; fix it or pass --skip-bad-lines"
                return out
        elif not text.strip():
            out.empty += 1
        else:
            out.texts.append(text)
    return out


def _json_document(line: bytes, json_key: str) -> tuple[str | None, str | None]:
    try:
        obj = json.loads(line.rstrip(b"\r\n"))
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except json.JSONDecodeError as e:
        return None, f"malformed JSON at column {e.pos + 1}: {e.msg.removesuffix(' at')}"
    except ValueError as e:  # e.g. numbers too long to convert
        return None, f"malformed JSON: {str(e).splitlines()[0]}"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if json_key not in obj:
        keys = ", ".join(list(obj)[:8])
        return None, f"no key '{json_key}' (keys: {keys}); pass --json-key KEY"
    text = obj[json_key]
    if not isinstance(text, str):
        return None, f"'{json_key}' is {type(text).__name__}, expected a string"
    return text, None


def _parse_text(chunk: Chunk, skip_bad_lines: bool) -> Parsed:
    out = Parsed()
    doc: list[bytes] = []
    start = 0
    for i, line in enumerate([*chunk.items, b""]):
        if line.strip():
            if not doc:
                start = i
            doc.append(line)
            continue
        if not doc:
            continue
        try:
            out.texts.append(b"".join(doc).decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError:
            bad = next(j for j, x in enumerate(doc) if not _is_utf8(x))
            out.bad += 1
            if not skip_bad_lines:
                out.error = (
                    f"{chunk.path}:{chunk.first + start + bad}: not valid UTF-8; fix it or pass --skip-bad-lines"
                )
                return out
        doc = []
    return out


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def iter_documents(paths: Iterable[str | Path], json_key: str = "text") -> Iterator[str]:
    """Every document of the inputs in order (strict: a bad line is a UserError)."""
    for path in check_inputs(paths, json_key):
        for chunk in iter_chunks(path, json_key):
            parsed = parse_chunk(chunk, json_key, skip_bad_lines=False)
            if parsed.error:  # without the preprocess-only hint: this reader has no --skip-bad-lines
                raise UserError(parsed.error.replace(" or pass --skip-bad-lines", ""))
            yield from parsed.texts
