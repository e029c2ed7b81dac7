"""scripts/bench_preprocess.py: its index reader and the equality check it proves ids with."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("bench_preprocess", ROOT / "scripts" / "bench_preprocess.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(prefix: Path, docs: list[list[int]], sizes: list[int]) -> None:
    """A Megatron mmap pair written by hand (uint16), with the given per-document sizes in the index."""
    tokens = np.array([t for d in docs for t in d], np.uint16)
    prefix.with_suffix(".bin").write_bytes(tokens.tobytes())
    s = np.array(sizes, np.int32)
    pointers = np.concatenate([[0], np.cumsum(s[:-1].astype(np.int64))]) * 2
    doc_idx = np.arange(len(docs) + 1, dtype=np.int64)
    head = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", len(s), len(doc_idx))
    prefix.with_suffix(".idx").write_bytes(head + s.tobytes() + pointers.astype(np.int64).tobytes() + doc_idx.tobytes())


def test_compare_accepts_megatron_deepspeed_sizes_without_eod(tmp_path):
    bp = _script()
    docs = [[5, 6, 7, 99], [8, 99], [1, 2, 3, 4, 5, 99]]  # 99 = EOD
    _write(tmp_path / "mt", docs, [len(d) for d in docs])
    _write(tmp_path / "mds", docs, [len(d) - 1 for d in docs])  # Megatron-DeepSpeed leaves the EOD out
    c = bp.compare(tmp_path / "mt", tmp_path / "mds", eod=99)
    assert c["bin_identical"] and c["doc_idx_equal"] and not c["sizes_equal"] and c["sizes_equal_up_to_eod"]
    assert c["same_ids"] and c["mtnlg_every_document_ends_with_eod"] and c["mtnlg_pointers_consistent"]
    assert bp.read_idx(tmp_path / "mt.idx")["sizes"].tolist() == [4, 2, 6]
    other = [[5, 6, 7, 99], [9, 99], [1, 2, 3, 4, 5, 99]]  # one token differs
    _write(tmp_path / "bad", other, [len(d) - 1 for d in other])
    assert not bp.compare(tmp_path / "mt", tmp_path / "bad", eod=99)["same_ids"]


def test_in_tool_rates_are_parsed():
    bp = _script()
    log = "Processed 200 documents (50.0 docs/s, 1.0 MB/s).\nProcessed 400 documents (51.0 docs/s, 2.0 MB/s).\n"
    assert abs(bp.in_tool_rate("megatron", log) - 2.0 * 2**20 / 1e6) < 1e-9
    assert bp.in_tool_rate("mtnlg", "... 32.7 MB in 2.4 s = 13.42 MB/s with 2 workers") == 13.42
