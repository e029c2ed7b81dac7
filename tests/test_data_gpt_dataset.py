"""GPT samples: length, document boundaries, coverage, splits, seeds, blends, cache."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from mtnlg.config import BlendItem, DataConfig
from mtnlg.data.gpt_dataset import GPTDataset, blend_indices, build_datasets, split_ranges
from mtnlg.data.indexed import IndexedDataset, IndexedDatasetWriter
from mtnlg.errors import UserError

SEQ = 16


def make_data(prefix, num_docs=120, base=0, seed=0):
    """Documents of 1..40 tokens whose token values are their global positions (+ base)."""
    sizes = np.random.default_rng(seed).integers(1, 41, size=num_docs)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_documents(np.arange(sizes.sum(), dtype=np.int64) + base, sizes)
    return IndexedDataset(prefix)


def doc_of_token(ds: IndexedDataset, base: int = 0):
    """Map a token value back to its document (values are positions)."""
    starts = np.concatenate([[0], np.cumsum(ds.sizes)])
    return lambda t: np.searchsorted(starts, np.asarray(t) - base, side="right") - 1


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "d"), tmp_path / "d"


def test_samples_have_seq_plus_one_tokens_and_cover_the_stream(data):
    ds, prefix = data
    (train, _, _) = build_datasets(DataConfig(prefix=str(prefix), split="1,0,0"), SEQ, 7, (50, 0, 0))
    assert isinstance(train, GPTDataset)
    n = len(train)
    assert n == train.num_epochs * ((ds.num_tokens - 1) // SEQ) >= 50
    samples = [train[i] for i in range(n)]
    assert all(s.shape == (SEQ + 1,) and s.dtype == np.int64 for s in samples)
    # Unshuffled, sample j is tokens [j*SEQ, (j+1)*SEQ] of the epoch-shuffled document stream.
    stream = np.concatenate([ds[int(d)] for d in train.doc_index])
    for i in range(n):
        j = int(train.shuffle_index[i])
        np.testing.assert_array_equal(samples[i], stream[j * SEQ : (j + 1) * SEQ + 1])
    # One epoch's samples see every token of every document.
    first_epoch = [samples[i] for i in range(n) if train.shuffle_index[i] < (ds.num_tokens - 1) // SEQ]
    seen = np.unique(np.concatenate(first_epoch))
    assert len(seen) >= ds.num_tokens - SEQ  # all but the tail that does not fill a sample
    assert np.all(seen < ds.num_tokens)
    # Samples run across document boundaries.
    which = doc_of_token(ds)
    assert sum(len(np.unique(which(s))) > 1 for s in samples) > n // 2


def test_epochs_are_whole_before_repeats(data):
    ds, prefix = data
    n = int(2.5 * ds.num_tokens / SEQ)  # two and a half epochs
    train = build_datasets(DataConfig(prefix=str(prefix), split="1,0,0"), SEQ, 1, (n, 0, 0))[0]
    assert train.num_epochs == 3
    n_docs = len(ds)
    for e in range(3):  # each epoch holds every document exactly once
        assert sorted(train.doc_index[e * n_docs : (e + 1) * n_docs].tolist()) == list(range(n_docs))
    # Samples come one epoch's worth at a time: the first chunks hold the first samples.
    per_epoch = (ds.num_tokens - 1) // SEQ
    assert set(train.shuffle_index[: 2 * per_epoch].tolist()) == set(range(2 * per_epoch))


def test_more_samples_only_append(data):
    """A run resumed with more iterations sees the same samples first (prefix-stable arrays)."""
    ds, prefix = data
    small = build_datasets(DataConfig(prefix=str(prefix), split="1,0,0"), SEQ, 5, (30, 0, 0))[0]
    large = build_datasets(DataConfig(prefix=str(prefix), split="1,0,0"), SEQ, 5, (3 * len(small), 0, 0))[0]
    assert large.num_epochs > small.num_epochs
    for i in range(len(small)):
        np.testing.assert_array_equal(small[i], large[i])


def test_splits_are_disjoint_by_document(data):
    ds, prefix = data
    datasets = build_datasets(DataConfig(prefix=str(prefix), split="80,10,10"), SEQ, 3, (40, 10, 10))
    assert [d.documents for d in datasets] == [(0, 96), (96, 108), (108, 120)]
    which = doc_of_token(ds)
    seen = []
    for d in datasets:
        docs = set(np.unique(np.concatenate([which(d[i]) for i in range(len(d))])).tolist())
        lo, hi = d.documents
        assert docs <= set(range(lo, hi))
        seen.append(docs)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(seen[1]) == 12 and len(seen[2]) == 12  # every held-out document is used


def test_split_ranges_and_zero_splits(data):
    assert split_ranges(10, (0.98, 0.01, 0.01)) == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges(1000, (0.98, 0.01, 0.01)) == [(0, 980), (980, 990), (990, 1000)]
    _, prefix = data
    train, valid, test = build_datasets(DataConfig(prefix=str(prefix), split="9,1,0"), SEQ, 1, (5, 5, 5))
    assert train is not None and valid is not None and test is None
    with pytest.raises(UserError, match="gives no documents of .* to valid"):
        build_datasets(DataConfig(prefix=str(prefix), split="1000,1,0"), SEQ, 1, (5, 5, 0))


def test_same_seed_same_samples_other_seed_other_samples(data, tmp_path):
    _, prefix = data
    cfg = DataConfig(prefix=str(prefix), split="1,0,0")
    a = build_datasets(cfg, SEQ, 11, (60, 0, 0))[0]
    elsewhere = DataConfig(prefix=str(prefix), split="1,0,0", cache_dir=str(tmp_path / "c2"))
    b = build_datasets(elsewhere, SEQ, 11, (60, 0, 0))[0]
    c = build_datasets(cfg, SEQ, 12, (60, 0, 0))[0]
    same = [np.array_equal(a[i], b[i]) for i in range(60)]
    differ = [np.array_equal(a[i], c[i]) for i in range(60)]
    assert all(same)  # rebuilt from scratch in another cache dir: identical
    assert sum(differ) < 5


def test_index_arrays_are_cached_and_lazy(data):
    _, prefix = data
    cfg = DataConfig(prefix=str(prefix), split="1,0,0")
    train = build_datasets(cfg, SEQ, 5, (30, 0, 0))[0]
    cache = prefix.parent / "index-cache"
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 4 and all(x.startswith("d-train-") for x in names) and names[-1].endswith(".json")
    assert isinstance(train.shuffle_index, np.memmap) and isinstance(train.indexed._bin, np.memmap)
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = build_datasets(cfg, SEQ, 5, (30, 0, 0))[0]
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes  # reused, not rebuilt
    np.testing.assert_array_equal(again[3], train[3])


def test_stale_cache_is_rebuilt_when_data_changes(data):
    ds, prefix = data
    cfg = DataConfig(prefix=str(prefix), split="1,0,0")
    old = build_datasets(cfg, SEQ, 5, (30, 0, 0))[0]
    old_first = old[0].copy()
    del old
    new_ds = make_data(prefix, num_docs=80, base=1_000_000, seed=9)  # same prefix, new content
    new = build_datasets(cfg, SEQ, 5, (30, 0, 0))[0]
    assert len(new.doc_index) == 80 * new.num_epochs
    assert all(new[i].min() >= 1_000_000 for i in range(len(new)))
    assert not np.array_equal(new[0], old_first)
    assert len(list((prefix.parent / "index-cache").glob("*.json"))) == 2
    assert new_ds.num_tokens == new.tokens_per_epoch


def test_damaged_cache_file_is_rebuilt(data):
    _, prefix = data
    cfg = DataConfig(prefix=str(prefix), split="1,0,0")
    first = build_datasets(cfg, SEQ, 5, (30, 0, 0))[0]
    expected = [first[i].copy() for i in range(len(first))]
    del first
    (shuffle,) = (prefix.parent / "index-cache").glob("*shuffle_index.npy")
    shuffle.write_bytes(shuffle.read_bytes()[:-12])
    again = build_datasets(cfg, SEQ, 5, (30, 0, 0))[0]
    assert [np.array_equal(again[i], e) for i, e in enumerate(expected)] == [True] * len(expected)


def _build_in_child(prefix: str, cache: str, q) -> None:
    ds = build_datasets(DataConfig(prefix=prefix, split="1,0,0", cache_dir=cache), SEQ, 2, (200, 0, 0))[0]
    q.put([int(x) for x in ds[7]])


def test_concurrent_builders_agree(data, tmp_path):
    _, prefix = data
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(prefix), str(tmp_path / "shared"), q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == results[2]
    assert not [p for p in (tmp_path / "shared").iterdir() if p.name.endswith(".tmp")]


def test_blend_indices_follow_weights_in_every_prefix():
    weights = [0.2, 0.3, 0.5]
    d, k = blend_indices(weights, 20_000, window=1000)  # several windows
    for n in (100, 1000, 20_000):
        counts = np.bincount(d[:n], minlength=3)
        assert np.all(np.abs(counts - np.array(weights) * n) <= 1.0), (n, counts)
    for j in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(k[d == j], np.arange((d == j).sum()))
    d2, k2 = blend_indices([2, 3, 5], 20_000)  # unnormalised weights, one window: same result
    np.testing.assert_array_equal(d, d2)
    np.testing.assert_array_equal(k, k2)


def test_blended_dataset_proportions_within_one_percent(tmp_path):
    bases = [0, 10_000_000, 20_000_000]
    for i, base in enumerate(bases):
        make_data(tmp_path / f"p{i}", num_docs=60, base=base, seed=i)
    weights = [0.6, 0.3, 0.1]
    blend = [BlendItem(prefix=str(tmp_path / f"p{i}"), weight=w) for i, w in enumerate(weights)]
    train, valid, _ = build_datasets(DataConfig(blend=blend, split="90,10,0"), SEQ, 4, (3000, 300, 0))
    assert len(train) == 3000 and len(valid) == 300
    for ds, n in ((train, 3000), (valid, 300)):
        source = np.array([ds[i][0] // 10_000_000 for i in range(n)])
        share = np.bincount(source, minlength=3) / n
        assert np.all(np.abs(share - weights) < 0.01), share
    again = build_datasets(DataConfig(blend=blend, split="90,10,0"), SEQ, 4, (3000, 300, 0))[0]
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 3000, 97))


def test_default_corpus_when_no_data_configured(tmp_path, monkeypatch):
    from functools import partial

    from mtnlg.data import corpus
    from mtnlg.data.gpt_dataset import build_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(corpus, "ensure_default_data", partial(corpus.ensure_default_data, limit=60, vocab_size=400))
    cfg = DataConfig(cache_dir=str(tmp_path), split="80,10,10")
    train, valid, test = build_datasets(cfg, 32, 1, (20, 4, 4))
    tok = build_tokenizer(cfg)
    assert tok is not None and tok.vocab_size <= 400
    assert train[0].shape == (33,) and int(train[0].max()) < tok.vocab_size
    assert valid.documents[0] == train.documents[1] and test.documents[0] == valid.documents[1]
    assert os.path.isdir(tmp_path / "default-data")


def test_datasets_pickle_as_paths_not_data(data, tmp_path):
    import pickle

    _, prefix = data
    make_data(tmp_path / "q", num_docs=50, base=5_000_000)
    single = build_datasets(DataConfig(prefix=str(prefix), split="1,0,0"), SEQ, 3, (100, 0, 0))[0]
    blend = [BlendItem(prefix=str(prefix), weight=1), BlendItem(prefix=str(tmp_path / "q"), weight=1)]
    blended = build_datasets(DataConfig(blend=blend, split="1,0,0"), SEQ, 3, (100, 0, 0))[0]
    for ds in (single, blended):
        blob = pickle.dumps(ds)
        assert len(blob) < 4000  # paths and scalars only: no token or index data
        clone = pickle.loads(blob)
        assert [np.array_equal(clone[i], ds[i]) for i in range(0, 100, 9)] == [True] * 12
