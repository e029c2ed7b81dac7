"""T5's data, in one process: sentinels in the tokenizer (Hugging Face T5's order, through save and load),
span corruption (lengths against the Hugging Face recipe's formula, statistics over many samples, sentinel
order, exact reconstruction, determinism per seed) over real indexed data, fine-tuning pairs from
``preprocess --sft``, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from mtnlg.config import BlendItem, SyntheticConfig
from mtnlg.errors import UserError

DOCS = [f"def f{i}(x):\n    Return x plus {i} and the {w} of the list." for i in range(60)
        for w in ("sum", "length", "first item")]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """(plain, with 100 sentinels): byte-level BPEs trained on the same text."""
    from mtnlg.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    train_tokenizer(DOCS, 300, root / "plain")
    train_tokenizer(DOCS, 300, root / "t5", vocab_extra_ids=100)
    return root / "plain", root / "t5"


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory, tok_dirs):
    """A real indexed dataset (``mtnlg preprocess``) of DOCS, tokenized without sentinels."""
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("data")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 4))
    preprocess([str(root / "docs.jsonl")], "text", load_tokenizer(tok_dirs[0]), str(root / "docs"), 1)
    return str(root / "docs")


def run_cfg(prefix, tokenizer, seq_length=64, seed=5, iters=40, gbs=8, sft=None, **knobs):
    from mtnlg.config import from_dict

    cfg = from_dict({
        "model": {"architecture": "gpt2", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "seq_length": seq_length},
        "train": {"iters": iters, "micro_batch_size": 2, "global_batch_size": gbs, "seed": seed,
                  "eval_interval": 10, "eval_iters": 2},
        "data": {"prefix": None if sft else prefix, "tokenizer": str(tokenizer), "split": "90,10,0",
                 "sft": {"prefix": sft} if sft else None},
    })
    knobs.setdefault("vocab_extra_ids", 100)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, family_knobs=SimpleNamespace(**knobs)))


# --------------------------------------------------------------------------- the tokenizer


def test_sentinels_in_hf_t5_order_through_save_and_load(tok_dirs, tmp_path):
    from transformers import AutoTokenizer

    from mtnlg.data.tokenizer import load_tokenizer

    plain, t5 = load_tokenizer(tok_dirs[0]), load_tokenizer(tok_dirs[1])
    # trained as a T5 tokenizer: HF T5's layout, <pad> = 0 (decoder start), EOS = 1, <extra_id_k> = V - 1 - k (the
    # recipe's create_sentinel_ids relies on the last)
    V = t5.vocab_size
    assert V == 300 + 100 and (t5.pad_id, t5.eod_id) == (0, 1) and plain.sentinel_ids == [] and plain.pad_id is None
    assert t5.sentinel_ids == [V - 1 - k for k in range(100)]
    assert not set(t5.encode("x <extra_id_0> <pad> <|endoftext|>")) & {0, 1, *t5.sentinel_ids}  # never forged
    hf = AutoTokenizer.from_pretrained(str(tok_dirs[1]), local_files_only=True)
    assert len(hf) == V and (hf.pad_token, hf.pad_token_id, hf.eos_token_id) == ("<pad>", 0, 1)
    assert hf.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(100)]) == t5.sentinel_ids
    assert hf.decode([t5.sentinel_ids[3]]) == "<extra_id_3>"
    # an existing tokenizer read with vocab_extra_ids: <pad> and the sentinels appended, ordinary ids unchanged
    ext = load_tokenizer(tok_dirs[0], vocab_extra_ids=100)
    W = ext.vocab_size
    assert W == plain.vocab_size + 101 and ext.pad_id == plain.vocab_size and ext.eod_id == plain.eod_id
    assert ext.sentinel_ids == [W - 1 - k for k in range(100)]
    text = "Return x plus 3 <extra_id_0> and <pad>"
    assert ext.encode(text) == plain.encode(text)
    ext.save(tmp_path / "ext")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "ext"), local_files_only=True)
    assert again.convert_tokens_to_ids(["<pad>", "<extra_id_0>", "<extra_id_99>"]) == [W - 101, W - 1, W - 100]
    # Hugging Face's own T5 tokenizer (its built-in layout) has the same layout, and reads as it is
    from transformers import T5Tokenizer

    T5Tokenizer(extra_ids=100).save_pretrained(str(tmp_path / "hf_t5"))
    hf_t5 = load_tokenizer(tmp_path / "hf_t5", vocab_extra_ids=100)
    n = hf_t5.vocab_size
    assert (hf_t5.pad_id, hf_t5.eod_id) == (0, 1) and hf_t5.sentinel_ids == [n - 1 - k for k in range(100)]
    # one that has them keeps them; a different count is refused
    assert load_tokenizer(tok_dirs[1], vocab_extra_ids=100).vocab_size == V
    with pytest.raises(UserError, match="already has 100 sentinels"):
        load_tokenizer(tok_dirs[1], vocab_extra_ids=50)


def test_tokenizer_train_command_adds_sentinels(tmp_path):
    from mtnlg.cli import main
    from mtnlg.data.tokenizer import load_tokenizer

    (tmp_path / "docs.txt").write_text("\n".join(DOCS[:30]))
    assert main(["tokenizer", "train", "--input", str(tmp_path / "docs.txt"), "--vocab-size", "280",
                 "--output", str(tmp_path / "tok"), "--vocab-extra-ids", "8"]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.sentinel_ids == [tok.vocab_size - 1 - k for k in range(8)] and (tok.pad_id, tok.eod_id) == (0, 1)
    assert main(["tokenizer", "train", "--input", str(tmp_path / "docs.txt"), "--vocab-size", "280",
                 "--output", str(tmp_path / "bad"), "--vocab-extra-ids", "-1"]) != 0


# --------------------------------------------------------------------------- lengths


def hf_recipe_lengths(inputs_length, noise_density, mean_noise_span_length):
    """Hugging Face's run_t5_mlm_flax ``compute_input_and_target_lengths`` (its formula, restated): the longest
    chunk whose corrupted input fits, and its target length."""
    def corrupted(tokens):
        noise = int(round(tokens * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length
    while corrupted(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, corrupted(tokens)[1]


@pytest.mark.parametrize("enc,density,mean", [(512, 0.15, 3.0), (128, 0.15, 3.0), (64, 0.15, 3.0),
                                              (256, 0.3, 5.0), (1024, 0.15, 2.0), (100, 0.25, 3.0)])
def test_derived_lengths_match_the_hf_recipe(enc, density, mean):
    from mtnlg.data.t5_span_corruption import corrupt, random_span_ids, span_lengths

    lengths = span_lengths(enc, density, mean)
    assert (lengths.raw, lengths.dec) == hf_recipe_lengths(enc, density, mean)
    if enc == 512:
        assert (lengths.raw, lengths.dec) == (568, 114)  # T5's published 512-token setting
    spans = random_span_ids(lengths.raw, density, mean, np.random.default_rng(0))
    e, t = corrupt(np.arange(lengths.raw), spans, np.arange(-1, -200, -1), -500)
    assert (len(e), len(t)) == (enc, lengths.dec)  # exactly: no encoder padding


# --------------------------------------------------------------------------- span corruption over real data


def check_sample(s, text, lengths, tok, exact):
    from mtnlg.data.t5_span_corruption import uncorrupt

    enc, labels = s["enc_tokens"], s["dec_labels"]
    assert all(v.dtype == np.int64 for v in s.values())
    assert enc.shape == (lengths.enc,) and labels.shape == s["dec_inputs"].shape == (lengths.dec,)
    n_enc, n_dec = int(s["enc_padding_mask"].sum()), int(s["dec_padding_mask"].sum())
    if exact:
        assert n_enc == lengths.enc and n_dec == lengths.dec
    assert (s["enc_padding_mask"][:n_enc] == 1).all() and (enc[n_enc:] == tok.pad_id).all()
    assert (labels[n_dec:] == -1).all() and (labels[:n_dec] >= 0).all()
    assert s["dec_inputs"][0] == tok.pad_id and (s["dec_inputs"][1:n_dec] == labels[: n_dec - 1]).all()
    assert enc[n_enc - 1] == tok.eod_id and labels[n_dec - 1] == tok.eod_id
    sent = np.asarray(tok.sentinel_ids)
    in_enc = [int(np.flatnonzero(sent == t)[0]) for t in enc[:n_enc] if t in sent]
    in_dec = [int(np.flatnonzero(sent == t)[0]) for t in labels[:n_dec] if t in sent]
    assert in_enc == in_dec == list(range(len(in_enc))) and in_enc  # <extra_id_0>, <extra_id_1>, ... in order
    assert labels[0] == sent[0]
    restored = uncorrupt(enc[:n_enc], labels[:n_dec], sent)
    np.testing.assert_array_equal(restored, text[: lengths.raw])  # the chunk, exactly


def span_stats(samples, lengths, sent):
    """(noise fraction, span lengths, fraction of noise per position) over samples."""
    sent = np.asarray(sent)
    fractions, spans = [], []
    for s in samples:
        labels = s["dec_labels"][s["dec_padding_mask"] == 1][:-1]  # without EOS
        starts = np.flatnonzero(np.isin(labels, sent))
        spans += np.diff(np.append(starts, len(labels))).tolist()
        fractions.append((len(labels) - len(starts)) / lengths.raw)
    return np.asarray(fractions), np.asarray(spans) - 1


def test_t5_span_corruption_statistics_and_reconstruction(data_prefix, tok_dirs):
    from mtnlg.data.gpt_dataset import build_datasets
    from mtnlg.data.t5_dataset import build_t5_sources, t5_lengths, t5_tokenizer

    cfg = run_cfg(data_prefix, tok_dirs[0], seq_length=128, iters=150)  # 1200 samples
    lengths, tok = t5_lengths(cfg), t5_tokenizer(cfg)
    assert (lengths.raw, lengths.dec) == hf_recipe_lengths(128, 0.15, 3.0)
    train, valid = build_t5_sources(cfg)
    text = build_datasets(cfg.data, lengths.raw, cfg.train.seed, (len(train), len(valid), 0))[0]
    samples = [train[i] for i in range(1200)]
    for i in range(0, 1200, 40):
        check_sample(samples[i], text[i], lengths, tok, exact=True)
    frac, spans = span_stats(samples, lengths, tok.sentinel_ids)
    noise = int(round(lengths.raw * 0.15))
    assert np.allclose(frac, noise / lengths.raw)  # the t5 style: exactly round(L * 0.15) noise tokens each
    assert spans.mean() == pytest.approx(noise / round(noise / 3.0))  # mean span length: 3 (here 21 / 7)
    counts = np.bincount(spans)[1:]
    assert spans.min() == 1 and spans.max() >= 10 and counts[0] > counts[2] > counts[5] > 0  # random segmentation
    # noise positions: as in T5 and the recipe, a chunk starts with a kept run and ends with a noise span; away
    # from its ends every position is noise equally often (the two halves within 10%)
    where = np.zeros(lengths.raw)
    for s in samples[:400]:
        where += _noise_positions(s, lengths, tok)
    assert where[0] == 0 and where[-1] == 400
    inner = where[15:-15]
    assert abs(inner[: len(inner) // 2].mean() / inner[len(inner) // 2:].mean() - 1) < 0.1
    assert inner.mean() / 400 == pytest.approx(0.15, abs=0.02)
    check_sample(valid[3], build_datasets(cfg.data, lengths.raw, cfg.train.seed, (len(train), len(valid), 0))[1][3],
                 lengths, tok, exact=True)


def _noise_positions(s, lengths, tok):
    """1 where the sample's chunk token was noise (from the encoder: a sentinel stands for the next span)."""
    sent = np.asarray(tok.sentinel_ids)
    enc = s["enc_tokens"][s["enc_padding_mask"] == 1][:-1]
    labels = s["dec_labels"][s["dec_padding_mask"] == 1][:-1]
    starts = np.flatnonzero(np.isin(labels, sent))
    span_len = np.diff(np.append(starts, len(labels))) - 1
    out, k = [], 0
    for t in enc.tolist():
        if t in sent:
            out += [1] * int(span_len[k])
            k += 1
        else:
            out.append(0)
    return np.asarray(out, dtype=float)


def test_ngram_masking_statistics(data_prefix, tok_dirs):
    from mtnlg.data.gpt_dataset import build_datasets
    from mtnlg.data.t5_dataset import build_t5_sources, t5_lengths, t5_tokenizer
    from mtnlg.data.t5_span_corruption import NGRAM_MAX

    cfg = run_cfg(data_prefix, tok_dirs[0], seq_length=128, iters=100, masking_style="ngram")
    lengths, tok = t5_lengths(cfg), t5_tokenizer(cfg)
    assert (lengths.raw, lengths.dec) == (127, 2 * 19 + 1)  # worst case: a span per noise token
    train, _ = build_t5_sources(cfg)
    text = build_datasets(cfg.data, lengths.raw, cfg.train.seed, (len(train), 0, 0))[0]
    samples = [train[i] for i in range(800)]
    for i in range(0, 800, 40):
        check_sample(samples[i], text[i], lengths, tok, exact=False)
    frac, spans = span_stats(samples, lengths, tok.sentinel_ids)
    assert np.mean(frac == 19 / 127) > 0.97  # the noise budget is met (almost always exactly)
    assert spans.max() == NGRAM_MAX and 3.4 < spans.mean() < 4.5  # geometric(0.2) capped at 10: mean <= 4.46
    # with a given shorter decoder, the spans of a sample are capped to fit it
    short = run_cfg(data_prefix, tok_dirs[0], seq_length=128, iters=100, masking_style="ngram", decoder_seq_length=24)
    s_train, _ = build_t5_sources(short)
    assert all(s_train[i]["dec_padding_mask"].sum() <= 24 for i in range(200))


def test_deterministic_per_seed(data_prefix, tok_dirs):
    from mtnlg.data.t5_dataset import build_t5_sources

    a, _ = build_t5_sources(run_cfg(data_prefix, tok_dirs[0], seed=5))
    b, _ = build_t5_sources(run_cfg(data_prefix, tok_dirs[0], seed=5))
    c, _ = build_t5_sources(run_cfg(data_prefix, tok_dirs[0], seed=6))
    order = [17, 3, 250, 3, 0]
    for i in order:  # any access order, any instance: the same sample
        assert all((a[i][k] == b[i][k]).all() for k in a[i])
    differ = sum(not (a[i]["enc_tokens"] == c[i]["enc_tokens"]).all() for i in range(20))
    assert differ >= 18
    again = pickle.loads(pickle.dumps(a))  # as DataLoader workers get it
    assert all((again[9][k] == a[9][k]).all() for k in a[9])


def test_blend(data_prefix, tok_dirs):
    from mtnlg.data.gpt_dataset import build_datasets
    from mtnlg.data.t5_dataset import build_t5_sources, t5_lengths, t5_tokenizer

    cfg = run_cfg(data_prefix, tok_dirs[0])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prefix=None, blend=[
        BlendItem(data_prefix, 1.0), BlendItem(data_prefix, 3.0)]))
    train, valid = build_t5_sources(cfg)
    lengths, tok = t5_lengths(cfg), t5_tokenizer(cfg)
    text = build_datasets(cfg.data, lengths.raw, cfg.train.seed, (len(train), len(valid), 0))
    for i in (0, 5, 77):
        check_sample(train[i], text[0][i], lengths, tok, exact=True)
    check_sample(valid[1], text[1][1], lengths, tok, exact=True)


# --------------------------------------------------------------------------- fine-tuning pairs


def test_sft_pairs_prompt_to_encoder_response_to_decoder(tmp_path, tok_dirs):
    from mtnlg.data.sft import preprocess_sft, render_chat
    from mtnlg.data.t5_dataset import build_t5_sft_sources, t5_tokenizer
    from mtnlg.data.tokenizer import load_tokenizer

    plain = load_tokenizer(tok_dirs[0])
    rows = [{"prompt": f"def f{i}(x):", "response": f" Return x plus {i}."} for i in range(18)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the sum"},
                              {"role": "user", "content": "and?"}, {"role": "assistant", "content": "the length"}]})
    rows.append({"prompt": "def g(x): " * 30, "response": " Return the first item of the list. " * 10})
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess_sft([str(tmp_path / "x.jsonl")], plain, tmp_path / "x", log=lambda _m: None)
    longest = len(plain.encode(rows[-1]["response"])) + 1  # the long response and its EOD
    cfg = run_cfg(None, tok_dirs[0], seq_length=32, iters=10, gbs=4, sft=str(tmp_path / "x"), decoder_seq_length=16)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="100,0,0"))
    with pytest.raises(UserError, match=f"1 of 20 examples .* longer than the decoder's 16 tokens.*the longest: "
                                        f"{longest} .*decoder_seq_length: {longest}"):
        build_t5_sft_sources(cfg)  # a response that does not fit the decoder: refused, not cut
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, family_knobs=SimpleNamespace(**{**vars(cfg.model.family_knobs), "decoder_seq_length": longest})))
    train, valid = build_t5_sft_sources(cfg)
    tok = t5_tokenizer(cfg)
    assert valid is None and len(train) == 40
    seen = set()
    for i in range(len(train)):
        s, e = train[i], train.example(i)
        seen.add(e)
        enc = s["enc_tokens"][s["enc_padding_mask"] == 1]
        labels = s["dec_labels"][s["dec_padding_mask"] == 1]
        assert s["dec_inputs"][0] == tok.pad_id and (s["dec_inputs"][1 : len(labels)] == labels[:-1]).all()
        assert (s["dec_labels"][len(labels):] == -1).all() and (s["enc_tokens"][len(enc):] == tok.pad_id).all()
        r = rows[e]
        if "prompt" in r:
            prompt, response = plain.encode(r["prompt"]), plain.encode(r["response"]) + [plain.eod_id]
        else:  # the last assistant message is the target; the chat before it (earlier answer included) the input
            ids, _ = render_chat(plain, r["messages"])
            response = plain.encode("the length") + [plain.eod_id]
            assert ids[-len(response):] == response
            prompt = ids[: -len(response)]
            assert "the sum" in plain.decode(prompt) and plain.decode(prompt).endswith("<|assistant|>\n")
        assert enc.tolist() == prompt[:31] + [plain.eod_id]  # cut to seq_length - 1, then EOD
        assert labels.tolist() == response  # whole, EOD included
    assert seen == set(range(len(rows)))  # every example in an epoch (20 examples, 40 samples: two epochs)
    assert [train.example(i) for i in range(20)] != [train.example(i) for i in range(20, 40)]


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line(data_prefix, tok_dirs):
    from mtnlg.data.t5_dataset import build_t5_sources
    from mtnlg.data.t5_span_corruption import span_lengths

    cases = [
        (run_cfg(data_prefix, tok_dirs[0], vocab_extra_ids=0), "has no sentinels"),
        (run_cfg(data_prefix, tok_dirs[1], vocab_extra_ids=20), "already has 100 sentinels"),
        (run_cfg(data_prefix, tok_dirs[0], seq_length=512, decoder_seq_length=100), "too short for noise_density"),
        (run_cfg(data_prefix, tok_dirs[0], seq_length=512, masking_style="ngram", decoder_seq_length=60),
         "too short for noise_density"),
        (run_cfg(data_prefix, tok_dirs[0], seq_length=2048), "sentinels; raise vocab_extra_ids"),
        (run_cfg(data_prefix, tok_dirs[0], masking_style="bert"), "masking_style"),
        (run_cfg(data_prefix, tok_dirs[0], seq_length=1500, vocab_extra_ids=1000),
         "chunks of 1666 tokens for model.seq_length 1500"),
        (dataclasses.replace(cfg := run_cfg(data_prefix, tok_dirs[0]), data=dataclasses.replace(
            cfg.data, tokenizer=None)), "set data.tokenizer"),
        (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prefix=None, synthetic=SyntheticConfig())),
         "data.synthetic"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError, match=message) as e:
            build_t5_sources(cfg)
        assert "\n" not in str(e.value)
    assert span_lengths(512, 0.15, 3.0, dec_length=120).dec == 120  # longer than needed: padded
    with pytest.raises(UserError, match="decoder_seq_length >= 114"):
        span_lengths(512, 0.15, 3.0, dec_length=113)
