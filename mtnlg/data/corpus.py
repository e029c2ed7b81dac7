"""The default corpus: docstrings of the Python standard library, built offline.

With no data configured, mtnlg trains on text every Python installation has. Each
document is one stdlib module rendered like ``help()``: its dotted name, the module
docstring, then ``class``/``def`` signatures with their docstrings (parsed with ``ast``;
nothing is imported). Modules are read in sorted path order and then put in a fixed
pseudo-random order, so a contiguous document split (``data.split``) holds out a
representative sample. Same Python, same bytes.

    prefix, tokenizer_dir = ensure_default_data()   # cached under ~/.cache/mtnlg
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mtnlg.data import indexed
from mtnlg.errors import UserError
from mtnlg.files import atomic_file, write_atomic

CORPUS_VERSION = 1
DEFAULT_VOCAB_SIZE = 8192
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_ORDER_SEED = 20240101


def default_cache_dir() -> Path:
    """``$MTNLG_CACHE`` or ``$XDG_CACHE_HOME/mtnlg`` (``~/.cache/mtnlg``), per Python version."""
    base = os.environ.get("MTNLG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtnlg"
    )
    return Path(base) / "default-data" / f"py{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library (no site-packages), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def module_document(path: Path, root: Path) -> str | None:
    """The help()-like text of one module, or None when it has no docstrings (or does not parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return None
    parts = list(_docstrings(tree.body, prefix=""))
    module_doc = ast.get_docstring(tree, clean=True)
    if module_doc:
        parts.insert(0, module_doc)
    if not parts:
        return None
    name = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    text = f"{name}\n{'=' * len(name)}\n\n" + "\n\n".join(parts)
    return text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be tokenized


def _docstrings(body: list[ast.stmt], prefix: str) -> Iterator[str]:
    for node in body:
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node, clean=True)
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            if doc:
                yield f"class {prefix}{node.name}({bases}):\n{_indent(doc)}"
            yield from _docstrings(node.body, prefix=f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                kind = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                yield f"{kind} {prefix}{node.name}({ast.unparse(node.args)}):\n{_indent(doc)}"


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else "" for line in text.splitlines())


def write_stdlib_corpus(path: str | Path, root: str | Path | None = None, limit: int | None = None) -> dict:
    """Write the corpus as JSON lines ``{"text": ...}`` (atomically); returns its stats.

    ``limit`` keeps the first N modules (in sorted order), for tests.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)[:limit]
    docs = [d for d in (module_document(p, root) for p in files) if d]
    if not docs:
        raise UserError(f"no docstrings found under {root}; set data.prefix to your own preprocessed data")
    order = np.random.RandomState(_ORDER_SEED).permutation(len(docs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_file(path) as f:
        for i in order:
            line = (json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n").encode("utf-8")
            digest.update(line)
            f.write(line)
    return {
        "version": CORPUS_VERSION,
        "python": sys.version,
        "stdlib": str(root),
        "limit": limit,
        "modules": len(files),
        "documents": len(docs),
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock so that concurrent ranks build the cache once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_default_data(
    cache_dir: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
    limit: int | None = None,
) -> tuple[str, str]:
    """Build what is missing of (stdlib corpus, BPE tokenizer, preprocessed data); return
    ``(prefix, tokenizer_dir)``. Cached in ``cache_dir`` (default: ``default_cache_dir()``);
    every piece is written atomically under a lock, so concurrent callers are safe.
    ``limit`` keeps only the first N stdlib modules (quick runs and tests).
    """
    from mtnlg.data.tokenizer import train_tokenizer

    return _ensure_data(cache_dir, vocab_size, workers, log, limit, tokenizer=("tokenizer", "tokenizer.json",
                        "a byte-level BPE tokenizer", train_tokenizer), items="stdlib", split_sentences=False)


def _ensure_data(cache_dir, vocab_size: int, workers: int, log, limit: int | None, tokenizer: tuple,
                 items: str, split_sentences: bool) -> tuple[str, str]:
    """The default corpus, a tokenizer trained on it and the corpus preprocessed with it, each built unless cached.
    ``tokenizer``: (directory stem, the file that marks it done, what it is, its trainer(texts, vocab, dir));
    ``items``: the stem of the preprocessed data's prefix."""
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.readers import iter_documents
    from mtnlg.data.tokenizer import load_tokenizer

    stem, done_file, what, train = tokenizer
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        with _locked(directory):
            corpus, meta = _ensure_corpus(directory, limit, say)
            tag = f"{vocab_size}-{meta['sha256'][:10]}"
            tok_dir = directory / f"{stem}-{tag}"
            if not (tok_dir / done_file).is_file():
                say(f"corpus: training {what} (vocab {vocab_size}) into {tok_dir}")
                train(iter_documents([corpus]), vocab_size, tok_dir)
            prefix = directory / f"{items}-{tag}"
            if not indexed.exists(prefix):
                preprocess([corpus], "text", load_tokenizer(tok_dir), prefix, workers=workers, log=say,
                           split_sentences=split_sentences)
    except OSError as e:
        raise UserError(
            f"cannot write the default corpus cache in {directory} ({e.strerror or e}); "
            "set data.cache_dir or $MTNLG_CACHE to a writable directory"
        ) from None
    return str(prefix), str(tok_dir)


def _ensure_corpus(directory: Path, limit: int | None, say: Callable[[str], None]) -> tuple[Path, dict]:
    """(corpus path, its metadata): the stdlib corpus in ``directory``, written unless current (hold the lock)."""
    corpus, meta_path = directory / "stdlib_docs.jsonl", directory / "stdlib_docs.json"
    meta = _read_meta(meta_path)
    current = meta is not None and all(
        meta.get(k) == v for k, v in [("version", CORPUS_VERSION), ("python", sys.version), ("limit", limit)]
    )
    if not (current and corpus.is_file() and corpus.stat().st_size == meta["bytes"]):
        say(f"corpus: writing the Python stdlib docstring corpus to {corpus}")
        meta = write_stdlib_corpus(corpus, limit=limit)
        write_atomic(meta_path, json.dumps(meta, indent=1) + "\n")
    assert meta is not None
    say(f"corpus: {corpus}: {meta['documents']:,} documents, {meta['bytes'] / 1e6:.2f} MB")
    return corpus, meta


def ensure_default_bert_data(
    cache_dir: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
    limit: int | None = None,
) -> tuple[str, str]:
    """As ``ensure_default_data``, for BERT: a lower-cased WordPiece tokenizer and the corpus split into
    sentences (``preprocess --split-sentences``); returns ``(prefix, tokenizer_dir)``."""
    from mtnlg.data.wordpiece import train_wordpiece

    return _ensure_data(cache_dir, vocab_size, workers, log, limit, tokenizer=("wordpiece", "vocab.txt",
                        "a lower-cased WordPiece tokenizer", train_wordpiece), items="stdlib-sentences",
                        split_sentences=True)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
