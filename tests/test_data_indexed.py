"""Megatron's mmap indexed dataset: byte layout, round trip, merge, and damaged files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from mtnlg.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype, merge
from mtnlg.errors import UserError

DOCS = [[1, 2, 3], [4, 5], [65000, 7, 8, 9]]


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        w.add_documents(np.concatenate([np.asarray(d) for d in docs]), [len(d) for d in docs])
    return IndexedDataset(prefix)


def test_idx_layout_field_by_field(tmp_path):
    write(tmp_path / "d", DOCS)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n, m = struct.unpack_from("<QQ", raw, 18)
    assert (version, code, n, m) == (1, 8, 3, 4)  # code 8 = uint16; m = documents + 1
    assert struct.unpack_from("<3i", raw, 34) == (3, 2, 4)  # sizes int32
    assert struct.unpack_from("<3q", raw, 34 + 12) == (0, 6, 10)  # byte pointers int64
    assert struct.unpack_from("<4q", raw, 34 + 12 + 24) == (0, 1, 2, 3)  # document index int64
    assert len(raw) == 34 + 12 + 24 + 32
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<9H", 1, 2, 3, 4, 5, 65000, 7, 8, 9)


def test_idx_bytes_equal_hand_packed_int32(tmp_path):
    write(tmp_path / "d", DOCS, dtype=best_dtype(100_000))
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 4, 3, 4)  # code 4 = int32
        + struct.pack("<3i", 3, 2, 4)
        + struct.pack("<3q", 0, 12, 20)
        + struct.pack("<4q", 0, 1, 2, 3)
    )
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<9i", 1, 2, 3, 4, 5, 65000, 7, 8, 9)


def test_best_dtype_follows_megatron():
    assert best_dtype(50257) is np.uint16
    assert best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=int(rng.integers(1, 40))) for _ in range(300)]
    with IndexedDatasetWriter(tmp_path / "r", np.uint16) as w:
        for a in range(0, 300, 70):  # several batches
            batch = docs[a : a + 70]
            w.add_documents(np.concatenate(batch), [len(d) for d in batch])
    ds = IndexedDataset(tmp_path / "r")
    assert len(ds) == ds.num_documents == 300
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i in (0, 1, 150, 299):
        np.testing.assert_array_equal(ds[i], docs[i])
    np.testing.assert_array_equal(ds.get(5, offset=1, length=2), docs[5][1:3])
    assert isinstance(ds._bin, np.memmap)  # lazy reads


def test_merge_keeps_documents_and_bytes(tmp_path):
    a = write(tmp_path / "a", DOCS[:2])
    b = write(tmp_path / "b", DOCS[2:])
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    write(tmp_path / "whole", DOCS)
    assert (tmp_path / "ab.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()
    assert (tmp_path / "ab.idx").read_bytes() == (tmp_path / "whole.idx").read_bytes()
    assert len(a) + len(b) == 3


def test_merge_rejects_mixed_dtypes(tmp_path):
    write(tmp_path / "a", DOCS, np.uint16)
    write(tmp_path / "b", DOCS, np.int32)
    with pytest.raises(UserError, match="different token dtypes"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert not list(tmp_path.glob("ab*")) and not list(tmp_path.glob(".ab*"))


def test_truncated_bin_is_a_clear_error(tmp_path):
    write(tmp_path / "d", DOCS)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-4])
    with pytest.raises(UserError, match=r"d\.bin is truncated: 14 bytes, but d\.idx describes 18") as e:
        IndexedDataset(tmp_path / "d")
    assert "\n" not in str(e.value)


def test_truncated_idx_is_a_clear_error(tmp_path):
    write(tmp_path / "d", DOCS)
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(raw[:-8])
    with pytest.raises(UserError, match=r"truncated or corrupt: 94 bytes .* needs 102"):
        IndexedDataset(tmp_path / "d")


@pytest.mark.parametrize(
    "patch, message",
    [
        (lambda raw: b"NOTMEGA\x00\x00" + raw[9:], "not a Megatron indexed-dataset index"),
        (lambda raw: raw[:9] + struct.pack("<Q", 2) + raw[17:], "unsupported index version 2"),
        (lambda raw: raw[:17] + b"\x09" + raw[18:], "unknown token dtype code 9"),
        (lambda raw: b'{"not": "an index"}', "not a Megatron indexed-dataset index"),
    ],
)
def test_foreign_idx_is_a_clear_error(tmp_path, patch, message):
    write(tmp_path / "d", DOCS)
    (tmp_path / "d.idx").write_bytes(patch((tmp_path / "d.idx").read_bytes()))
    with pytest.raises(UserError, match=message) as e:
        IndexedDataset(tmp_path / "d")
    assert "\n" not in str(e.value)


def test_missing_files_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"nothing\.idx not found"):
        IndexedDataset(tmp_path / "nothing")


def test_failed_write_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_documents(np.arange(5), [5])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_old_pair(tmp_path):
    write(tmp_path / "d", DOCS)
    ds = write(tmp_path / "d", [[9, 9]])
    assert len(ds) == 1 and ds.num_tokens == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
