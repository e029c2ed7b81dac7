"""Tokenizers: train a byte-level BPE, load an HF directory, GPT-2's own BPE files or a BERT vocab.txt.

    tok = load_tokenizer(tokenizer_dir="runs/tok")                       # any HF fast tokenizer
    tok = load_tokenizer(vocab_file="encoder.json", merge_file="vocab.bpe")  # GPT-2's exact ids
    tok = load_tokenizer(vocab_file="vocab.txt")                         # BERT WordPiece (mtnlg.data.wordpiece)
    ids = tok.encode("Hello world") + [tok.eod_id]

``encode`` treats the spelling of every special token (``<|endoftext|>`` ...) as ordinary
text: raw data can never forge a document boundary. T5's sentinels (``<extra_id_0>`` ...) and a ``<pad>``
are added by ``with_extra_ids`` (Megatron's ``--vocab-extra-ids``), in Hugging Face's T5 order.
``save(dir)`` writes a directory that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads offline
(where HF's own encoding of course keeps its usual special-token matching).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from mtnlg.errors import UserError
from mtnlg.files import atomic_dir

EOD = "<|endoftext|>"
PAD = "<pad>"  # added with the sentinels when a tokenizer has no pad token (T5's decoder start token)
# GPT-2's pre-tokenizer regex (as used by tiktoken's "gpt2" encoding and HF's ByteLevel).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """A small facade over an HF fast tokenizer (and, for GPT-2 BPE, an id-equal tiktoken engine).

    With a tiktoken engine the HF tokenizer may be given as ``hf_factory`` instead: it is built on
    first use of ``hf``/``decode``/``save`` (importing transformers and building it costs about a
    second, which ``mtnlg preprocess`` of GPT-2 BPE never needs).
    """

    def __init__(self, hf: Any = None, name: str = "", tiktoken_encoding: Any = None, *,
                 hf_factory: Any = None, eod_id: int | None = None, vocab_size: int | None = None) -> None:
        self.name = name
        self._sentinels: list[int] | None = None
        self._tiktoken = tiktoken_encoding
        self._hf, self._hf_factory, self._backend_cache = None, None, None
        if hf is None:  # lazy: needs the engine and the numbers the HF tokenizer would give
            if hf_factory is None or tiktoken_encoding is None or eod_id is None or vocab_size is None:
                raise ValueError("a lazy Tokenizer needs hf_factory, tiktoken_encoding, eod_id and vocab_size")
            self._hf_factory, self.eod_id, self.vocab_size = hf_factory, int(eod_id), int(vocab_size)
            return
        self._set_hf(hf)
        self.eod_id = _find_eod(hf, name)
        self.vocab_size = len(hf)

    def _set_hf(self, hf: Any) -> None:
        if not hasattr(hf, "backend_tokenizer"):
            raise UserError(
                f"tokenizer {self.name or type(hf).__name__} is not a fast (tokenizer.json) tokenizer; "
                "convert it with transformers and save it again"
            )
        self._hf = hf

    @property
    def hf(self) -> Any:
        if self._hf is None:
            self._set_hf(self._hf_factory())
        return self._hf

    @property
    def _backend(self) -> Any:
        """A private copy of the backend whose encode never matches special-token spellings."""
        if self._backend_cache is None:
            from tokenizers import Tokenizer as _Backend

            backend = _Backend.from_str(self.hf.backend_tokenizer.to_str())
            backend.encode_special_tokens = True
            self._backend_cache = backend
        return self._backend_cache

    @property
    def engine(self) -> str:
        """'tiktoken' (GPT-2 BPE, proven id-equal in the tests) or 'hf'."""
        return "tiktoken" if self._tiktoken is not None else "hf"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added, none matched in the text)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tiktoken is not None:
            enc = self._tiktoken.encode_ordinary
            return [enc(t) for t in texts]
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of T5's sentinels ``<extra_id_0>``, ``<extra_id_1>``, ... in that order; [] when it has none."""
        if self._sentinels is None:
            vocab, ids = self.hf.get_vocab(), []
            while sentinel_token(len(ids)) in vocab:
                ids.append(int(vocab[sentinel_token(len(ids))]))
            self._sentinels = ids
        return self._sentinels

    @property
    def pad_id(self) -> int | None:
        """The pad token's id (T5's decoder start token), None when it has none."""
        return self.hf.pad_token_id

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write an HF tokenizer directory (atomically: a temp dir renamed into place)."""
        directory = Path(directory)
        try:
            with atomic_dir(directory) as tmp:
                self.hf.save_pretrained(str(tmp))
        except OSError as e:
            raise UserError(f"cannot write tokenizer directory {directory} ({e.strerror or e})") from None
        return directory

    def __getstate__(self) -> dict[str, Any]:
        # The private backend copy is rebuilt on demand (the HF tokenizer pickles through its JSON).
        state = self.__dict__.copy()
        state["_backend_cache"] = None
        return state

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id}, engine={self.engine})"


def _find_eod(hf: Any, name: str) -> int:
    vocab = hf.get_vocab()
    if EOD in vocab:
        return int(vocab[EOD])
    if hf.eos_token_id is not None:
        return int(hf.eos_token_id)
    raise UserError(
        f"tokenizer {name} has no end-of-document token ({EOD} or an eos_token); "
        "add one to the tokenizer or train one with `mtnlg tokenizer train`"
    )


# --------------------------------------------------------------------------- loading


def load_tokenizer(
    tokenizer_dir: str | Path | None = None,
    vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
    vocab_extra_ids: int = 0,
    lower_case: bool | None = None,
) -> Tokenizer:
    """An HF tokenizer directory, GPT-2 BPE files (``encoder.json`` + ``vocab.bpe``) or a BERT ``vocab.txt``
    alone (``lower_case``: None infers it from the vocabulary, see mtnlg.data.wordpiece); with
    ``vocab_extra_ids`` T5's sentinels are added unless it has them (``with_extra_ids``)."""
    if merge_file is not None and vocab_file is None:
        raise UserError("merge_file needs vocab_file (GPT-2 BPE: encoder.json + vocab.bpe); give both")
    if (tokenizer_dir is None) == (vocab_file is None):
        raise UserError("give a tokenizer directory, vocab_file + merge_file (GPT-2 BPE) or vocab_file alone "
                        "(a BERT vocab.txt): exactly one of them")
    if tokenizer_dir is not None:
        tok = _load_hf_dir(Path(tokenizer_dir))
    elif merge_file is None:
        from mtnlg.data.wordpiece import load_wordpiece_vocab

        if vocab_extra_ids:
            raise UserError("T5 sentinels (vocab_extra_ids) do not apply to a BERT vocab.txt")
        return load_wordpiece_vocab(vocab_file, lower_case)  # type: ignore[arg-type]
    else:
        tok = load_gpt2_bpe(Path(vocab_file), Path(merge_file))  # type: ignore[arg-type]
    return with_extra_ids(tok, vocab_extra_ids) if vocab_extra_ids else tok


def _load_hf_dir(directory: Path) -> Tokenizer:
    if not directory.is_dir():
        raise UserError(f"tokenizer directory {directory} not found; train one with `mtnlg tokenizer train`")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer from {directory}: {first}") from None
    if type(getattr(hf, "backend_tokenizer", None) and hf.backend_tokenizer.model).__name__ == "WordPiece":
        from mtnlg.data.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer(hf, name=str(directory))
    return Tokenizer(hf, name=str(directory))


def load_gpt2_bpe(vocab_file: Path, merge_file: Path) -> Tokenizer:
    """GPT-2's byte-level BPE from its original files, giving exactly GPT-2's ids."""
    for p in (vocab_file, merge_file):
        if not p.is_file():
            raise UserError(f"GPT-2 BPE file {p} not found; pass --vocab-file encoder.json --merge-file vocab.bpe")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{vocab_file}: not a GPT-2 encoder.json ({e}); pass the encoder.json of the BPE") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise UserError(f"{vocab_file}: expected a JSON object of token -> id (GPT-2 encoder.json)")
    merges = []
    for n, line in enumerate(merge_file.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise UserError(f"{merge_file}:{n}: expected two space-separated symbols (a GPT-2 vocab.bpe merge)")
        merges.append((pair[0], pair[1]))
    name = f"gpt2-bpe:{vocab_file}"
    engine = _tiktoken_gpt2(vocab, merges)
    if engine is not None and EOD in vocab:  # the HF tokenizer (same ids) is built only if asked for
        return Tokenizer(name=name, tiktoken_encoding=engine, hf_factory=partial(_gpt2_hf, vocab, merges),
                         eod_id=vocab[EOD], vocab_size=len(vocab))
    return Tokenizer(_gpt2_hf(vocab, merges), name=name, tiktoken_encoding=engine)


def _gpt2_hf(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as _Backend
    from transformers import PreTrainedTokenizerFast

    backend = _Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(EOD, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOD, eos_token=EOD, unk_token=EOD)


def _tiktoken_gpt2(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """tiktoken's engine for the same vocabulary, or None if tiktoken is absent or ids would differ.

    tiktoken merges by the rank of the merged token, HF by the rank of the merge; the two
    agree when every non-byte token's id is 256 + the rank of the merge that makes it, as in
    GPT-2's files (checked here; the tests compare ids on real text).
    """
    try:
        import tiktoken
    except ImportError:
        return None
    byte_of = _bytes_of_unicode()
    if EOD not in vocab or len(merges) + 257 != len(vocab):
        return None
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token == EOD:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            return None
    for r, (a, b) in enumerate(merges):
        if vocab.get(a + b) != 256 + r:
            return None
    if sorted(ranks.values()) != list(range(len(ranks))):
        return None
    return tiktoken.Encoding(
        "mtnlg-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOD: vocab[EOD]}
    )


def _bytes_of_unicode() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (char -> byte)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# --------------------------------------------------------------------------- T5's sentinels


def sentinel_token(k: int) -> str:
    return f"<extra_id_{k}>"


def with_extra_ids(tokenizer: Tokenizer, n: int) -> Tokenizer:
    """The tokenizer with ``n`` sentinels (Megatron's ``--vocab-extra-ids``): ``<pad>`` first when it has no pad
    token, then ``<extra_id_{n-1}>`` ... ``<extra_id_0>``, so that ``<extra_id_k>`` is ``vocab_size - 1 - k`` as in
    Hugging Face's T5 tokenizers. Ids of ordinary text do not change. A tokenizer that has ``n`` is returned as is."""
    have = len(tokenizer.sentinel_ids)
    if n < 0:
        raise UserError(f"vocab_extra_ids = {n} must be >= 0")
    if have == n:
        return tokenizer
    if have:
        raise UserError(f"tokenizer {tokenizer.name} already has {have} sentinels (<extra_id_0> ...) but "
                        f"vocab_extra_ids = {n}; set vocab_extra_ids to {have}")
    from tokenizers import AddedToken

    hf = copy.deepcopy(tokenizer.hf)
    if hf.pad_token is None:
        hf.add_special_tokens({"pad_token": PAD})
    names = [sentinel_token(k) for k in range(n)]
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in reversed(names)], special_tokens=True)
    _set_extra_special_tokens(hf, names)
    out = Tokenizer(hf, name=tokenizer.name, tiktoken_encoding=tokenizer._tiktoken)
    if out.sentinel_ids != list(range(len(hf) - 1, len(hf) - 1 - n, -1)):
        raise UserError(f"tokenizer {tokenizer.name} already spells some of <extra_id_0> ... <extra_id_{n - 1}> as "
                        "ordinary tokens, so the sentinels cannot take the last ids; train it again with "
                        "--vocab-extra-ids")
    return out


def _set_extra_special_tokens(hf: Any, names: list[str]) -> None:
    """List the sentinels as the tokenizer's extra special tokens, in name order (as T5's tokenizers do)."""
    if hasattr(hf, "extra_special_tokens"):  # transformers 5
        hf.extra_special_tokens = names
    else:
        hf.additional_special_tokens = names


# --------------------------------------------------------------------------- training


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, output_dir: str | Path | None = None, min_frequency: int = 2,
    vocab_extra_ids: int = 0,
) -> Tokenizer:
    """Train a byte-level BPE (all 256 bytes in the alphabet, so nothing is ever unknown) with EOD.

    Deterministic for the same documents. With ``output_dir`` the result is saved there.
    The vocabulary may come out smaller than ``vocab_size`` when the text has too few pairs.
    With ``vocab_extra_ids`` it is a T5 tokenizer laid out as Hugging Face's: ``<pad>`` = 0 (the decoder start
    token), EOD = 1 (T5's ``</s>``), the BPE, then the sentinels (``with_extra_ids``; not counted in ``vocab_size``).
    """
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOD] if vocab_extra_ids else [EOD]
    if vocab_size < 256 + len(specials):
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs >= {256 + len(specials)} "
                        f"(256 bytes + {'<pad> + EOD' if vocab_extra_ids else 'EOD'})")
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_nonempty(documents), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOD, eos_token=EOD, unk_token=EOD,
                                 pad_token=PAD if vocab_extra_ids else None)
    tok = Tokenizer(hf, name=str(output_dir or "trained"))
    if vocab_extra_ids:
        tok = with_extra_ids(tok, vocab_extra_ids)
    if output_dir is not None:
        tok.save(output_dir)
    return tok


def _nonempty(documents: Iterable[str]) -> Iterator[str]:
    n = 0
    for d in documents:
        if d:
            n += 1
            yield d
    if n == 0:
        raise UserError("no text to train the tokenizer on: every input document is empty")

