"""BERT data: sentence-split preprocessing, WordPiece tokenizers, and the masked sentence-pair samples
(statistics over many samples, exact reproduction per seed, the cached sample map)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mtnlg.cli import main
from mtnlg.data.bert_dataset import BertDataset, build_bert_sources, build_sample_map
from mtnlg.data.indexed import IndexedDataset
from mtnlg.data.sentences import split_sentences
from mtnlg.data.tokenizer import load_tokenizer
from mtnlg.data.wordpiece import WordPieceTokenizer, load_wordpiece_vocab
from mtnlg.errors import UserError

SEQ = 48


def _documents(n_docs: int = 80, seed: int = 0) -> list[str]:
    """Multi-sentence documents of made-up words (long ones split into several word pieces)."""
    rng = np.random.RandomState(seed)
    syllables = ["ka", "lo", "mi", "ten", "dra", "sup", "or", "vel", "qui", "zan", "bor", "ep"]
    words = ["".join(rng.choice(syllables, rng.randint(1, 5))) for _ in range(150)]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(1, 9)):
            ws = list(rng.choice(words, rng.randint(3, 12)))
            ws[0] = ws[0].capitalize()
            sentences.append(" ".join(ws) + rng.choice([".", "!", "?"]))
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(wordpiece dir, sentence-split prefix, documents), made through the CLI."""
    d = tmp_path_factory.mktemp("bert")
    docs = _documents()
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + [""]))
    assert main(["tokenizer", "train", "--type", "wordpiece", "--input", str(corpus), "--vocab-size", "160",
                 "--output", str(d / "wp")]) == 0
    assert main(["preprocess", "--split-sentences", "--input", str(corpus), "--tokenizer", str(d / "wp"),
                 "--output-prefix", str(d / "sent"), "--workers", "1"]) == 0
    return d / "wp", d / "sent", docs


def test_sentence_splitter_keeps_text_and_abbreviations():
    text = "Use e.g. this one. Then Mr. Smith came; it isn't 3.5 here!  Is it?\n\nSee os.path.join() now"
    assert split_sentences(text) == ["Use e.g. this one.", "Then Mr. Smith came; it isn't 3.5 here!", "Is it?",
                                     "See os.path.join() now"]
    assert split_sentences("   \n\n ") == []


def test_preprocess_split_sentences_one_item_per_sentence(data):
    wp, prefix, docs = data
    ds = IndexedDataset(prefix)
    tok = load_tokenizer(wp)
    assert ds.num_documents == len(docs)  # the empty document is skipped
    for k in (0, 7, len(docs) - 1):
        sentences = split_sentences(docs[k])
        a, b = int(ds.doc_idx[k]), int(ds.doc_idx[k + 1])
        assert b - a == len(sentences)
        assert [list(ds[i]) for i in range(a, b)] == [tok.encode(s) for s in sentences]  # no EOD
    assert len(ds) == sum(len(split_sentences(t)) for t in docs)
    from mtnlg.data.preprocess import preprocess

    two = prefix.parent / "sent2"  # two workers on 2 KB chunks (~20 of them): the same bytes
    preprocess([prefix.parent / "corpus.jsonl"], "text", tok, two, workers=2, log=None, chunk_bytes=2000,
               split_sentences=True)
    for suffix in (".bin", ".idx"):
        assert (two.parent / f"sent2{suffix}").read_bytes() == (prefix.parent / f"sent{suffix}").read_bytes()


def test_wordpiece_tokenizer_directory_and_vocab_txt(data, tmp_path):
    wp, _, docs = data
    tok = load_tokenizer(wp)
    assert isinstance(tok, WordPieceTokenizer) and tok.lower_case
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    same = load_tokenizer(vocab_file=wp / "vocab.txt")  # vocab.txt alone: lower-casing inferred (no capitals)
    assert same.lower_case and same.encode(docs[3]) == tok.encode(docs[3])
    assert tok.encode("KALO") == tok.encode("kalo")
    assert tok.continuation_mask().sum() > 20  # the made-up words do split into ## pieces
    # a hand-written cased BERT vocab.txt: greedy longest-match-first pieces, unknown words as [UNK]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "Hello", "hello", ",", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cased = load_wordpiece_vocab(tmp_path / "vocab.txt")
    assert not cased.lower_case
    assert cased.encode("Hello, unaffable!") == [8, 10, 5, 6, 7, 11]
    assert cased.encode("HELLO") == [1]
    lower = load_tokenizer(vocab_file=tmp_path / "vocab.txt", lower_case=True)
    assert lower.encode("HELLO") == [9]
    (tmp_path / "bad.txt").write_text("[PAD]\n[UNK]\nx\n")
    with pytest.raises(UserError, match="lacks \\[CLS\\], \\[SEP\\], \\[MASK\\]"):
        load_wordpiece_vocab(tmp_path / "bad.txt")


def _dataset(data, tmp_path, seed=5, n=1500, **kw):
    wp, prefix, _ = data
    ds = IndexedDataset(prefix)
    return BertDataset(ds, (0, ds.num_documents), load_tokenizer(wp), SEQ, seed, n, tmp_path, **kw)


def test_masking_statistics(data, tmp_path):
    ds = _dataset(data, tmp_path)
    tok = load_tokenizer(data[0])
    cont = tok.continuation_mask()
    special = set(tok.special_ids)
    rng = np.random.RandomState(0)
    predicted = pieces = masked = kept = 0
    swapped, ngrams, lengths = [], Counter(), []
    for i in range(len(ds)):
        s = ds[i]
        assert all(len(s[k]) == SEQ for k in ("tokens", "types", "labels", "loss_mask", "padding_mask"))
        n = int(s["padding_mask"].sum())
        assert (s["padding_mask"][:n] == 1).all() and (s["tokens"][n:] == tok.pad_id).all()
        lengths.append(n)
        orig = np.where(s["labels"] >= 0, s["labels"], s["tokens"])[:n]
        seps = np.flatnonzero(orig == tok.sep_id)
        assert orig[0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1
        assert (s["types"][: seps[0] + 1] == 0).all() and (s["types"][seps[0] + 1 : n] == 1).all()
        assert ((s["labels"] >= 0) == (s["loss_mask"] == 1)).all()
        pos = np.flatnonzero(s["loss_mask"])
        assert not set(orig[pos].tolist()) & special
        content = n - 3
        assert len(pos) <= max(1, round(0.15 * content))
        predicted, pieces = predicted + len(pos), pieces + content
        masked += int((s["tokens"][pos] == tok.mask_id).sum())
        kept += int((s["tokens"][pos] == s["labels"][pos]).sum())
        # whole words: a word's pieces are predicted together
        for k in range(1, n):
            if cont[orig[k]] and orig[k - 1] not in special:
                assert s["loss_mask"][k] == s["loss_mask"][k - 1], (i, k)
        swapped.append(int(s["is_random"]))
        ngrams.update(ds.choose_masked(orig, rng)[1])
    rate, p_mask, p_kept = predicted / pieces, masked / predicted, kept / predicted
    print(f"mask rate {rate:.4f}, [MASK] {p_mask:.3f}, kept {p_kept:.3f}, SOP {np.mean(swapped):.3f}, "
          f"n-grams {dict(sorted(ngrams.items()))}, samples {len(ds)}")
    assert abs(rate - 0.15) < 0.01
    assert abs(p_mask - 0.8) < 0.03
    # kept: 10% kept + the random 10% that happen to draw the same piece (1 / 155)
    assert abs(p_kept - 0.1) < 0.02
    assert abs(np.mean(swapped) - 0.5) < 0.04
    assert set(ngrams) == {1, 2, 3} and ngrams[1] > ngrams[2] > ngrams[3]
    # p(n) ~ 1/n (6/11, 3/11, 2/11): measured on long inputs, where an n-gram is rarely shortened to fit the
    # budget (in 48-token samples it often is)
    words = np.flatnonzero(~cont & ~np.isin(np.arange(len(cont)), tok.special_ids))
    long = Counter()
    for k in range(20):
        body = np.random.RandomState(k).choice(words, 2000)
        long.update(ds.choose_masked(np.concatenate([[tok.cls_id], body, [tok.sep_id]]), rng)[1])
    share = {n: long[n] / sum(long.values()) for n in (1, 2, 3)}
    print(f"n-gram shares on 2000-word inputs {share}")
    assert all(abs(share[n] - (6 / 11) / n) < 0.03 for n in (1, 2, 3))


def test_short_sequences_and_sample_map(data, tmp_path):
    wp, prefix, _ = data
    ds = IndexedDataset(prefix)
    rows = build_sample_map(ds.sizes, ds.doc_idx, (0, ds.num_documents), SEQ - 3, 0.1, 2, 9, 4000)
    short = np.mean(rows[:, 2] < SEQ - 3)
    print(f"short-sequence rate {short:.3f} over {len(rows)} groups")
    assert abs(short - 0.1 * (1 - 1 / (SEQ - 4))) < 0.02  # the uniform draw may land on the full length
    sizes = ds.sizes.astype(int)
    for first, end, target in rows[:300]:
        assert end - first >= 2
        doc = np.searchsorted(ds.doc_idx, first, side="right") - 1
        assert end <= ds.doc_idx[doc + 1]  # one document
        # gathers sentences until the target is reached (and two are there), no further
        assert sizes[first : end - 1].sum() < target or end - first == 2
    assert np.array_equal(build_sample_map(ds.sizes, ds.doc_idx, (0, ds.num_documents), SEQ - 3, 0.1, 2, 9, 10),
                          rows[: len(build_sample_map(ds.sizes, ds.doc_idx, (0, ds.num_documents), SEQ - 3, 0.1,
                                                      2, 9, 10))])  # asking for more appends


def _same(a, b) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_reproduction_per_seed_and_cache(data, tmp_path, monkeypatch):
    a = _dataset(data, tmp_path / "a", n=200)
    b = _dataset(data, tmp_path / "b", n=200)
    assert all(_same(a[i], b[i]) for i in range(len(a)))
    c = _dataset(data, tmp_path / "c", seed=6, n=200)
    assert sum(_same(a[i], c[i]) for i in range(50)) < 5
    cached = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert any(n.endswith("-samples.npy") for n in cached) and not any("tmp" in n for n in cached)
    import mtnlg.data.bert_dataset as bd

    def no_build(*args, **kwargs):
        raise AssertionError("the sample map was rebuilt instead of read from the cache")

    monkeypatch.setattr(bd, "build_sample_map", no_build)
    hit = _dataset(data, tmp_path / "a", n=200)
    assert all(_same(a[i], hit[i]) for i in range(len(a)))


def test_no_binary_head(data, tmp_path):
    ds = _dataset(data, tmp_path, n=100, binary_head=False)
    tok = load_tokenizer(data[0])
    for i in range(50):
        s = ds[i]
        n = int(s["padding_mask"].sum())
        orig = np.where(s["labels"] >= 0, s["labels"], s["tokens"])[:n]
        assert orig[0] == tok.cls_id and list(orig).count(tok.sep_id) == 1 and orig[n - 1] == tok.sep_id
        assert s["is_random"] == 0 and (s["types"] == 0).all()


def test_build_bert_sources_from_a_run_config(data, tmp_path):
    from mtnlg.config import BlendItem, from_dict

    wp, prefix, _ = data
    cfg = from_dict({
        "model": {"architecture": "gpt2", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "seq_length": SEQ},
        "train": {"iters": 20, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 5,
                  "eval_iters": 2, "seed": 3},
        "data": {"prefix": str(prefix), "tokenizer": str(wp), "split": "90,10,0", "cache_dir": str(tmp_path)},
    })
    train, valid = build_bert_sources(cfg)
    assert len(train) >= 80 and len(valid) >= 8
    assert train.documents[1] == valid.documents[0]
    assert set(train[0]) == {"tokens", "types", "labels", "loss_mask", "padding_mask", "is_random"}
    assert all(v.dtype == np.int64 for v in train[0].values()) and train[0]["is_random"].shape == ()
    import pickle

    clone = pickle.loads(pickle.dumps(train))  # as DataLoader workers get it: paths, not data
    assert len(pickle.dumps(train)) < 20_000 and _same(clone[7], train[7])
    cfg.data.prefix, cfg.data.blend = None, [BlendItem(str(prefix), 3.0), BlendItem(str(prefix), 1.0)]
    blended, _ = build_bert_sources(cfg)
    assert len(blended) == 80 and np.bincount(blended.dataset_index).tolist() == [60, 20]
    assert set(blended[5]) == set(train[0])
    cfg.data.blend = None
    gpt = tmp_path / "gpt"
    assert main(["preprocess", "--input", str(prefix.parent / "corpus.jsonl"), "--tokenizer", str(wp),
                 "--output-prefix", str(gpt), "--workers", "1"]) == 0
    cfg.data.prefix = str(gpt)
    with pytest.raises(UserError, match="not split into sentences; re-run `mtnlg preprocess --split-sentences`"):
        build_bert_sources(cfg)


def test_cased_training_and_the_default_bert_corpus(data, tmp_path):
    from mtnlg.data.corpus import ensure_default_bert_data
    from mtnlg.data.wordpiece import train_wordpiece

    _, _, docs = data
    cased = train_wordpiece(docs, 160, tmp_path / "cased", lower_case=False)
    assert not cased.lower_case and cased.encode("Kalo") != cased.encode("kalo")
    assert not load_tokenizer(vocab_file=tmp_path / "cased" / "vocab.txt").lower_case  # capitals in the vocab
    prefix, tok_dir = ensure_default_bert_data(tmp_path / "default", vocab_size=400, limit=12, log=lambda m: None)
    ds, tok = IndexedDataset(prefix), load_tokenizer(tok_dir)
    assert isinstance(tok, WordPieceTokenizer) and tok.lower_case
    assert len(ds) > 2 * ds.num_documents > 0 and int(max(ds[i].max() for i in range(len(ds)))) < tok.vocab_size
    assert ensure_default_bert_data(tmp_path / "default", vocab_size=400, limit=12, log=lambda m: None) == (
        prefix, tok_dir)  # cached


def test_bert_cli_flags_refused_where_they_do_not_apply(data, tmp_path, capsys):
    wp, prefix, _ = data
    corpus = str(prefix.parent / "corpus.jsonl")
    cases = [
        (["preprocess", "--input", corpus, "--tokenizer", str(wp), "--lower-case", "--output-prefix",
          str(tmp_path / "x")], "--lower-case/--cased apply to a BERT --vocab-file vocab.txt only"),
        (["preprocess", "--sft", "--split-sentences", "--input", corpus, "--tokenizer", str(wp), "--output-prefix",
          str(tmp_path / "x")], "--split-sentences applies to plain documents, not --sft data"),
        (["tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--cased", "--output", str(tmp_path / "t")],
         "--lower-case/--cased apply to --type wordpiece only"),
        (["tokenizer", "train", "--type", "wordpiece", "--input", corpus, "--vocab-size", "3", "--output",
          str(tmp_path / "t")], "--vocab-size 3 is too small for WordPiece"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing written
