"""GPT training samples over indexed datasets: split, shuffled, blended, cached.

    train, valid, test = build_datasets(cfg.data, seq_length=1024, seed=1234,
                                        num_samples=(iters * gbs, evals * gbs, gbs))
    tokens = train[i]      # np.int64[seq_length + 1] for GLOBAL sample index i

Megatron's scheme. ``data.split`` cuts a dataset's documents (sequences) into three
contiguous, disjoint ranges. For one range:

- document index: the range's documents, shuffled afresh each epoch, for as many epochs as
  ``num_samples`` needs;
- sample index: (position in the document index, token offset) where each sample starts;
  sample j covers tokens [j * L, (j + 1) * L] of the concatenated stream (L = seq_length),
  so samples run across document boundaries and consecutive samples share one token;
- shuffle index: samples come in chunks of one epoch's worth (``samples_per_epoch``), each
  chunk permuted on its own. Every array is *prefix-stable*: asking for more samples (a run
  resumed with more iterations) appends, and never reorders the samples already served.

The arrays depend only on (the .idx bytes, the range, L, seed, epochs); they are cached as
.npy files keyed by a hash of those, written atomically (every rank may build them; they
are identical) and opened with mmap, as are the tokens: a rank reads only what it asks for.
A blend interleaves several datasets so that every prefix of the samples follows the
weights to within one sample per dataset (see ``blend_indices``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mtnlg.config import DataConfig, parse_split
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.tokenizer import Tokenizer, load_tokenizer
from mtnlg.errors import UserError
from mtnlg.files import atomic_file, write_atomic

INDEX_VERSION = 2
SPLIT_NAMES = ("train", "valid", "test")
_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- entry points


def build_datasets(
    data_cfg: DataConfig, seq_length: int, seed: int, num_samples: Sequence[int]
) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """(train, valid, test) for ``data.prefix``, ``data.blend`` or, with neither, the default
    corpus. A split whose fraction or sample count is 0 gives None. ``data.synthetic`` is
    served elsewhere (mtnlg.data.synthetic)."""
    if data_cfg.synthetic is not None:
        raise ValueError("data.synthetic is not an indexed dataset; use mtnlg.data.synthetic")
    if seq_length < 1:
        raise UserError(f"seq_length = {seq_length} must be positive")
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three counts >= 0, got {num_samples}")
    fractions = parse_split(data_cfg.split)
    if data_cfg.blend is not None:
        prefixes = [b.prefix for b in data_cfg.blend]
        weights = [b.weight for b in data_cfg.blend]
    else:
        prefixes, weights = [data_cfg.prefix or default_data(data_cfg)[0]], [1.0]
    sources = [IndexedDataset(p) for p in prefixes]
    out: list[GPTDataset | BlendedDataset | None] = []
    for split_id, (fraction, n) in enumerate(zip(fractions, num_samples)):
        if fraction == 0 or n == 0:
            out.append(None)
            continue
        if len(sources) == 1:
            out.append(_split_dataset(sources[0], fractions, split_id, seq_length, seed, n, data_cfg.cache_dir))
            continue
        dataset_index, dataset_sample_index = cached_blend_indices(
            weights, n, _cache_dir(sources[0], data_cfg.cache_dir), SPLIT_NAMES[split_id]
        )
        counts = np.bincount(dataset_index, minlength=len(sources))
        parts = [
            _split_dataset(s, fractions, split_id, seq_length, seed, int(c), data_cfg.cache_dir) if c else None
            for s, c in zip(sources, counts)
        ]
        out.append(BlendedDataset(parts, dataset_index, dataset_sample_index))
    return tuple(out)


def build_tokenizer(data_cfg: DataConfig, vocab_extra_ids: int = 0) -> Tokenizer | None:
    """The tokenizer named by the data config (HF dir or GPT-2 files), the default corpus's
    tokenizer when no data is configured, else None (pre-tokenized data without one).
    ``vocab_extra_ids``: T5's sentinels, added unless the tokenizer has them."""
    if data_cfg.tokenizer is not None or data_cfg.vocab_file is not None:
        return load_tokenizer(data_cfg.tokenizer, data_cfg.vocab_file, data_cfg.merge_file, vocab_extra_ids,
                              lower_case=data_cfg.lower_case)
    if data_cfg.prefix is None and data_cfg.blend is None and data_cfg.synthetic is None:
        return load_tokenizer(default_data(data_cfg)[1], vocab_extra_ids=vocab_extra_ids)
    return None


def default_data(data_cfg: DataConfig) -> tuple[str, str]:
    """(prefix, tokenizer_dir) of the default stdlib corpus (built on first use)."""
    from mtnlg.data.corpus import default_cache_dir, ensure_default_data

    cache = default_cache_dir()
    if data_cfg.cache_dir is not None:
        cache = Path(data_cfg.cache_dir) / cache.relative_to(cache.parent.parent)
    key = str(cache.resolve())
    if key not in _DEFAULT_DATA:  # asked for twice per run (tokenizer, dataset): report the corpus once
        _DEFAULT_DATA[key] = ensure_default_data(cache)
    return _DEFAULT_DATA[key]


_DEFAULT_DATA: dict[str, tuple[str, str]] = {}  # cache dir -> (prefix, tokenizer_dir), built or checked this process


def split_ranges(num_documents: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges for (train, valid, test) fractions (disjoint, covering all)."""
    bounds = [0]
    acc = 0.0
    for f in fractions:
        acc += f
        bounds.append(min(num_documents, int(round(acc * num_documents))))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


def _split_dataset(
    source: IndexedDataset,
    fractions: Sequence[float],
    split_id: int,
    seq_length: int,
    seed: int,
    num_samples: int,
    cache_dir: str | None,
) -> GPTDataset:
    start, end = split_ranges(len(source), fractions)[split_id]
    if end <= start:
        raise UserError(
            f"data.split gives no documents of {source.prefix} ({len(source)} documents) to "
            f"{SPLIT_NAMES[split_id]}; use more data or change data.split"
        )
    return GPTDataset(
        source, (start, end), seq_length, seed, num_samples, _cache_dir(source, cache_dir), SPLIT_NAMES[split_id]
    )


def _cache_dir(source: IndexedDataset, cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else source.idx_path.parent / "index-cache"


# --------------------------------------------------------------------------- one dataset


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens over documents ``[start, end)`` of one indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: tuple[int, int],
        seq_length: int,
        seed: int,
        num_samples: int,
        cache_dir: str | Path,
        name: str = "train",
    ) -> None:
        self.indexed = indexed
        self.documents = documents
        self.seq_length = seq_length
        self.seed = seed
        start, end = documents
        self.tokens_per_epoch = int(indexed.sizes[start:end].sum(dtype=np.int64))
        if self.tokens_per_epoch < 2:
            raise UserError(
                f"{indexed.prefix}: the {name} documents hold {self.tokens_per_epoch} tokens; need more data"
            )
        self.samples_per_epoch = (self.tokens_per_epoch - 1) // seq_length
        if self.samples_per_epoch < 1:
            raise UserError(
                f"{indexed.prefix}: the {name} documents hold {self.tokens_per_epoch} tokens, fewer than one "
                f"sample of seq_length + 1 = {seq_length + 1}; use more data or a shorter seq_length"
            )
        self.num_epochs = max(1, math.ceil(num_samples / self.samples_per_epoch))
        key = {
            "kind": "gpt",
            "version": INDEX_VERSION,
            "idx_sha1": file_digest(indexed.idx_path),
            "documents": [start, end],
            "seq_length": seq_length,
            "seed": seed,
            "epochs": self.num_epochs,
            "split": name,
        }
        stem = f"{Path(indexed.prefix).name}-{name}"
        arrays = cached_arrays(Path(cache_dir), stem, key, self._build, self._valid)
        self.doc_index = arrays["doc_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build(self) -> dict[str, np.ndarray]:
        start, end = self.documents
        docs = np.arange(start, end, dtype=np.int32 if end <= _INT32_MAX else np.int64)
        rng = np.random.RandomState([self.seed % 2**32, start % 2**32, 0])
        doc_index = np.concatenate([rng.permutation(docs) for _ in range(self.num_epochs)])
        L, per_epoch = self.seq_length, self.samples_per_epoch
        n = self.num_epochs * per_epoch  # every chunk full: more epochs only append
        cum = np.zeros(len(doc_index) + 1, dtype=np.int64)
        np.cumsum(self.indexed.sizes[doc_index], out=cum[1:])
        starts = np.arange(n + 1, dtype=np.int64) * L
        pos = np.searchsorted(cum, starts, side="right") - 1
        pos_dtype = np.int32 if len(doc_index) <= _INT32_MAX else np.int64
        sample_index = np.stack([pos, starts - cum[pos]], axis=1).astype(pos_dtype)
        idx_dtype = np.int32 if n <= _INT32_MAX else np.int64
        shuffle = np.concatenate([
            np.random.RandomState([self.seed % 2**32, start % 2**32, 1, k]).permutation(
                np.arange(k * per_epoch, (k + 1) * per_epoch, dtype=idx_dtype))
            for k in range(self.num_epochs)
        ])
        return {"doc_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle}

    def _valid(self, a: dict[str, np.ndarray]) -> bool:
        n = self.num_epochs * self.samples_per_epoch
        ndocs = self.documents[1] - self.documents[0]
        return (
            a["doc_index"].shape == (ndocs * self.num_epochs,)
            and a["sample_index"].shape == (n + 1, 2)
            and a["shuffle_index"].shape == (n,)
        )

    def __getstate__(self) -> dict:
        return _pickle_memmaps(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_unpickle_memmaps(state))

    def __len__(self) -> int:
        """Samples available (>= the ``num_samples`` asked for: whole epochs are built)."""
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        j = int(self.shuffle_index[i])
        d0, o0 = (int(x) for x in self.sample_index[j])
        d1, o1 = (int(x) for x in self.sample_index[j + 1])
        get, docs = self.indexed.get, self.doc_index
        if d0 == d1:
            parts = [get(int(docs[d0]), o0, o1 - o0 + 1)]
        else:
            parts = [get(int(docs[d0]), o0)]
            parts += [get(int(docs[d])) for d in range(d0 + 1, d1)]
            parts.append(get(int(docs[d1]), 0, o1 + 1))
        out = np.concatenate(parts).astype(np.int64)
        assert len(out) == self.seq_length + 1
        return out


# --------------------------------------------------------------------------- blending


class BlendedDataset:
    """Sample i is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]``."""

    def __init__(
        self, datasets: list[GPTDataset | None], dataset_index: np.ndarray, dataset_sample_index: np.ndarray
    ) -> None:
        self.datasets = datasets
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __getstate__(self) -> dict:
        return _pickle_memmaps(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_unpickle_memmaps(state))

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        dataset = self.datasets[int(self.dataset_index[i])]
        assert dataset is not None
        return dataset[int(self.dataset_sample_index[i])]


def blend_indices(weights: Sequence[float], num_samples: int, window: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Interleave datasets by weight: dataset d's k-th sample is due at time (k + 0.5) / w_d
    and samples are taken in order of due time (ties by d). After any i samples each dataset
    has round(w_d * i) samples give or take one. Built window by window in O(window) memory.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise UserError(f"blend weights must be positive numbers, got {list(weights)}")
    w = w / w.sum()
    dataset_index = np.empty(num_samples, dtype=np.int16 if len(w) < 2**15 else np.int32)
    sample_index = np.empty(num_samples, dtype=np.int64)
    next_k = np.zeros(len(w), dtype=np.int64)
    filled, t_end = 0, 0
    while filled < num_samples:
        t_end += window
        times, which, ks = [], [], []
        for d, wd in enumerate(w):
            k = np.arange(next_k[d], int(math.ceil(t_end * wd)) + 2, dtype=np.int64)
            due = (k + 0.5) / wd
            keep = np.searchsorted(due, t_end, side="left")  # due < t_end
            times.append(due[:keep])
            which.append(np.full(keep, d, dtype=dataset_index.dtype))
            ks.append(k[:keep])
            next_k[d] += keep
        t, dd, kk = np.concatenate(times), np.concatenate(which), np.concatenate(ks)
        order = np.lexsort((dd, t))[: num_samples - filled]
        dataset_index[filled : filled + len(order)] = dd[order]
        sample_index[filled : filled + len(order)] = kk[order]
        filled += len(order)
    return dataset_index, sample_index


def cached_blend_indices(
    weights: Sequence[float], num_samples: int, cache_dir: Path, name: str
) -> tuple[np.ndarray, np.ndarray]:
    key = {"kind": "blend", "version": INDEX_VERSION, "weights": [float(x) for x in weights], "n": num_samples}
    arrays = cached_arrays(
        cache_dir,
        f"blend-{name}",
        key,
        lambda: dict(zip(("dataset_index", "dataset_sample_index"), blend_indices(weights, num_samples))),
        lambda a: a["dataset_index"].shape == (num_samples,) and a["dataset_sample_index"].shape == (num_samples,),
    )
    return arrays["dataset_index"], arrays["dataset_sample_index"]


# --------------------------------------------------------------------------- caching


def cached_arrays(
    cache_dir: Path,
    stem: str,
    key: dict,
    build: Callable[[], dict[str, np.ndarray]],
    valid: Callable[[dict[str, np.ndarray]], bool],
) -> dict[str, np.ndarray]:
    """Arrays cached as ``{stem}-{hash(key)}-{name}.npy`` (mmap-loaded; rebuilt if missing or bad).

    Each file is written to a private temp name and renamed, so any number of processes
    may build at once: the arrays are a pure function of ``key``.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = cache_dir / f"{stem}-{digest}"
    desc = Path(f"{base}.json")
    if desc.is_file():
        try:
            names = json.loads(desc.read_text())["arrays"]
            arrays = {n: np.load(f"{base}-{n}.npy", mmap_mode="r") for n in names}
            if valid(arrays):
                return arrays
        except (OSError, ValueError, KeyError, EOFError):
            pass
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for n, a in arrays.items():
            _save_npy(Path(f"{base}-{n}.npy"), a)
        write_atomic(desc, json.dumps({"key": key, "arrays": list(arrays)}, indent=1))
    except OSError as e:
        raise UserError(
            f"cannot write the sample-index cache in {cache_dir} ({e.strerror}); "
            "set data.cache_dir to a writable directory"
        ) from None
    return {n: np.load(f"{base}-{n}.npy", mmap_mode="r") for n in arrays}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as f:  # a file object: np.save would add ".npy" to a temporary name
        np.save(f, array)


def _pickle_memmaps(state: dict) -> dict:
    """Cached .npy arrays pickle as their paths (cheap to send to DataLoader workers)."""
    return {k: ("npy-mmap", v.filename) if isinstance(v, np.memmap) else v for k, v in state.items()}


def _unpickle_memmaps(state: dict) -> dict:
    return {
        k: np.load(v[1], mmap_mode="r") if isinstance(v, tuple) and v[:1] == ("npy-mmap",) else v
        for k, v in state.items()
    }


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha1 of a file's bytes (memoised per path, size, mtime and inode)."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _DIGESTS:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]
