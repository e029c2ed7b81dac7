"""The default corpus: stdlib docstrings, deterministic bytes, cached build, CLI."""

from __future__ import annotations

import json
import sysconfig
import textwrap
from functools import partial
from pathlib import Path

import pytest

from mtnlg.cli import main as cli
from mtnlg.data import corpus
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_stdlib_files_are_the_standard_library_only():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = corpus.stdlib_files(root)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert "json/decoder.py" in rel and "os.py" in rel
    assert not [r for r in rel if "site-packages" in r or "__pycache__" in r]
    assert len(files) > 500


def test_module_document_format(tmp_path):
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text(
        textwrap.dedent('''
        """Module doc."""
        class A(Base):
            """Class doc.

            More."""
            def m(self, x=1, *a, k: int = 2):
                """Method doc."""
            def undocumented(self):
                pass
        async def g():
            """Coroutine doc."""
        ''')
    )
    assert corpus.module_document(src, tmp_path) == (
        "pkg.mod\n=======\n\nModule doc.\n\n"
        "class A(Base):\n    Class doc.\n\n    More.\n\n"
        "def A.m(self, x=1, *a, k: int=2):\n    Method doc.\n\n"
        "async def g():\n    Coroutine doc."
    )
    (tmp_path / "bad.py").write_text("def broken(:\n")
    (tmp_path / "bare.py").write_text("x = 1\n")
    assert corpus.module_document(tmp_path / "bad.py", tmp_path) is None
    assert corpus.module_document(tmp_path / "bare.py", tmp_path) is None


def test_corpus_bytes_are_deterministic(tmp_path):
    a = corpus.write_stdlib_corpus(tmp_path / "a.jsonl", limit=120)
    b = corpus.write_stdlib_corpus(tmp_path / "b.jsonl", limit=120)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a["sha256"] == b["sha256"] and a["documents"] == b["documents"] > 50
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == a["documents"] and a["bytes"] == (tmp_path / "a.jsonl").stat().st_size
    texts = [json.loads(line)["text"] for line in lines]
    assert all(t.split("\n")[1].startswith("===") for t in texts)
    names = [t.split("\n")[0] for t in texts]
    assert names != sorted(names)  # a fixed shuffle, so a contiguous split is a fair sample
    assert sorted(names) == sorted(set(names))


def test_ensure_default_data_builds_once(tmp_path):
    logs: list[str] = []
    prefix, tok_dir = corpus.ensure_default_data(tmp_path, vocab_size=300, limit=40, log=logs.append)
    ds, tok = IndexedDataset(prefix), load_tokenizer(tok_dir)
    meta = json.loads((tmp_path / "stdlib_docs.json").read_text())
    assert len(ds) == meta["documents"] and tok.vocab_size <= 300
    assert int(ds[0][-1]) == tok.eod_id and (ds.sizes > 1).all()
    first = json.loads((tmp_path / "stdlib_docs.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    assert ds[0].tolist() == tok.encode(first) + [tok.eod_id]
    built = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert corpus.ensure_default_data(tmp_path, vocab_size=300, limit=40, log=logs.append) == (prefix, tok_dir)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == built
    Path(prefix + ".bin").unlink()  # a missing piece is rebuilt, the rest reused
    corpus.ensure_default_data(tmp_path, vocab_size=300, limit=40, log=logs.append)
    assert IndexedDataset(prefix).num_tokens == ds.num_tokens
    assert (tmp_path / "stdlib_docs.jsonl").stat().st_mtime_ns == built["stdlib_docs.jsonl"]
    assert sum("training a byte-level BPE" in line for line in logs) == 1


def test_cli_corpus(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "ensure_default_data", partial(corpus.ensure_default_data, limit=30))
    assert cli(["corpus", "--output", str(tmp_path / "c"), "--vocab-size", "300", "--workers", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    prefix = out[0].removeprefix("corpus: data.prefix = ")
    assert out[1].startswith("corpus: data.tokenizer = ")
    assert len(IndexedDataset(prefix)) == json.loads((tmp_path / "c" / "stdlib_docs.json").read_text())["documents"]
