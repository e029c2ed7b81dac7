"""BERT's WordPiece tokenizer: train one, or read an existing ``vocab.txt`` (lower-cased or cased).

    tok = train_wordpiece(documents, vocab_size=512, output_dir="runs/wp")    # also writes vocab.txt
    tok = load_wordpiece_vocab("bert-base-uncased/vocab.txt")                  # lower-casing inferred
    tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id, tok.unk_id

As Megatron's ``BertWordPieceLowerCase`` / ``BertWordPieceCase``: BERT's normaliser (accents
stripped when lower-casing), punctuation and whitespace split, greedy longest-match-first word
pieces with ``##`` continuations. ``lower_case=None`` infers it from the vocabulary: lower-case
when no ordinary token has an upper-case letter (as in every uncased BERT vocab.txt). The
end-of-document id (for plain, non-sentence preprocessing) is [SEP], as in Megatron.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mtnlg.data.tokenizer import Tokenizer, _nonempty
from mtnlg.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer(Tokenizer):
    """A Tokenizer over an HF BERT tokenizer, with its special ids and which ids continue a word."""

    def __init__(self, hf: Any, name: str = "") -> None:
        self.name = name
        self._tiktoken, self._hf_factory, self._backend_cache = None, None, None
        self._sentinels: list[int] | None = None  # T5's, never BERT's (attributes of the base Tokenizer)
        self._set_hf(hf)
        vocab = hf.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise UserError(
                f"WordPiece vocabulary {name} lacks {', '.join(missing)}; a BERT vocab.txt needs "
                f"{', '.join(SPECIAL_TOKENS)} (train one with `mtnlg tokenizer train --type wordpiece`)"
            )
        self._pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (int(vocab[t]) for t in SPECIAL_TOKENS)
        self.eod_id = self.sep_id
        self.vocab_size = len(hf)
        self.lower_case = bool(getattr(hf, "do_lower_case", False))
        tokens = [""] * self.vocab_size
        for t, i in vocab.items():
            tokens[i] = t
        self.id_to_token = tokens

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) characters in ``text`` (SQuAD answer spans)."""
        e = self._backend.encode(text, add_special_tokens=False)
        return list(e.ids), [tuple(o) for o in e.offsets]

    def continuation_mask(self) -> np.ndarray:
        """bool[vocab_size]: True for ``##`` pieces (they continue the word before them)."""
        return np.array([t.startswith("##") for t in self.id_to_token], dtype=bool)

    def save(self, directory: str | Path) -> Path:
        """An HF tokenizer directory plus BERT's ``vocab.txt`` (one token per line, by id), atomically."""
        from mtnlg.files import atomic_dir

        directory = Path(directory)
        try:
            with atomic_dir(directory) as tmp:
                self.hf.save_pretrained(str(tmp))
                (Path(tmp) / "vocab.txt").write_text("".join(t + "\n" for t in self.id_to_token), encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write tokenizer directory {directory} ({e.strerror or e})") from None
        return directory

    def __repr__(self) -> str:
        case = "lower-case" if self.lower_case else "cased"
        return f"WordPieceTokenizer({self.name!r}, vocab_size={self.vocab_size}, {case})"


def bert_hf(vocab: dict[str, int], lower_case: bool) -> Any:
    """HF's BERT tokenizer (fast) over a token -> id vocabulary."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=vocab, do_lower_case=lower_case, strip_accents=None)


def infer_lower_case(vocab: Iterable[str]) -> bool:
    """True when no ordinary token (special tokens [..] and <..> aside) has an upper-case letter."""
    for t in vocab:
        if (t.startswith("[") and t.endswith("]")) or (t.startswith("<") and t.endswith(">")):
            continue
        if any(c.isupper() for c in t):
            return False
    return True


def load_wordpiece_vocab(vocab_file: str | Path, lower_case: bool | None = None) -> WordPieceTokenizer:
    """A BERT ``vocab.txt`` (one token per line, the id is the line number)."""
    path = Path(vocab_file)
    if not path.is_file():
        raise UserError(f"WordPiece vocabulary {path} not found; pass a BERT vocab.txt with --vocab-file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable BERT vocab.txt ({e})") from None
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for n, token in enumerate(lines, 1):
        token = token.rstrip("\r")
        if not token or token in vocab:
            what = "an empty line" if not token else f"{token!r} again (first on line {vocab[token] + 1})"
            raise UserError(f"{path}:{n}: {what}; a BERT vocab.txt has one distinct token per line")
        vocab[token] = n - 1
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:  # checked here: HF's tokenizer would add them as new tokens
        raise UserError(f"{path} lacks {', '.join(missing)}; a BERT vocab.txt has {', '.join(SPECIAL_TOKENS)}")
    lower = infer_lower_case(vocab) if lower_case is None else lower_case
    return WordPieceTokenizer(bert_hf(vocab, lower), name=f"wordpiece:{path}")


def train_wordpiece(
    documents: Iterable[str],
    vocab_size: int,
    output_dir: str | Path | None = None,
    lower_case: bool = True,
    min_frequency: int = 2,
) -> WordPieceTokenizer:
    """Train a WordPiece vocabulary (special tokens first: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4).

    Deterministic for the same documents. With ``output_dir`` it is saved there (tokenizer.json and
    vocab.txt, which ``--vocab-file`` reads back with the same ids).
    """
    from tokenizers import Tokenizer as _Backend
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small for WordPiece (5 special tokens + characters)")
    backend = _Backend(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lower_case, strip_accents=None)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    backend.train_from_iterator(_nonempty(documents), trainer)
    vocab = backend.get_vocab()
    tok = WordPieceTokenizer(bert_hf(vocab, lower_case), name=str(output_dir or "trained-wordpiece"))
    if output_dir is not None:
        tok.save(output_dir)
    return tok
