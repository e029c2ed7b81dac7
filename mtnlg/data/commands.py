"""The data subcommands of ``mtnlg``: tokenizer train, preprocess, merge-data, corpus.

``add_commands(subparsers)`` registers them on the CLI (``mtnlg.cli``, the one entry point); each
handler takes the parsed args, returns an exit code and raises ``UserError`` for bad input.
"""

from __future__ import annotations

import argparse
import os

from mtnlg.errors import UserError
from mtnlg.files import dir_problem


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tokenizer``, ``preprocess``, ``merge-data`` and ``corpus`` on the mtnlg CLI."""
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE or a WordPiece (BERT) tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser("train", help="train a byte-level BPE (with <|endoftext|>) or a WordPiece (BERT) on "
                        ".jsonl/.txt/.parquet/.arrow files or saved HF datasets")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="training text (files or dataset dirs)")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. special tokens "
                   "(and, for bpe, the 256 bytes)")
    t.add_argument("--type", choices=["bpe", "wordpiece"], default="bpe", help="byte-level BPE (GPT, default) or "
                   "WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK] (BERT; also writes vocab.txt)")
    _add_case_args(t, "wordpiece: ")
    t.add_argument("--output", required=True, metavar="DIR", help="directory for the HF tokenizer files")
    t.add_argument("--json-key", default="text", help="document key of JSON lines / column of a parquet file or HF "
                   "dataset (default text)")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    t.add_argument("--vocab-extra-ids", type=int, default=0, metavar="N", help="a T5 tokenizer: <pad> = 0, "
                   "<|endoftext|> = 1 and the sentinels <extra_id_0>...<extra_id_N-1> as the last ids (T5 uses 100; "
                   "default 0)")
    t.set_defaults(func=cmd_tokenizer_train)

    p = subparsers.add_parser("preprocess", help="tokenize documents into PREFIX.bin/PREFIX.idx (Megatron format)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".jsonl, .txt, .parquet or .arrow files, or directories saved by datasets' save_to_disk")
    p.add_argument("--json-key", default="text", help="document key of JSON lines / column of a parquet file or HF "
                   "dataset (default text)")
    _add_tokenizer_args(p)
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: cores)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of failing")
    p.add_argument("--sft", action="store_true", help="fine-tuning data: prompt/response or chat JSON lines -> "
                   "token ids (PREFIX.bin/.idx) + loss mask (PREFIX.mask.bin/.idx); see mtnlg/data/sft.py")
    p.add_argument("--max-length", type=int, default=None, help="--sft: longest example in tokens (default: none)")
    p.add_argument("--overflow", choices=["truncate", "drop"], default="truncate",
                   help="--sft: what to do with an example over --max-length (default truncate)")
    p.add_argument("--split-sentences", action="store_true", help="one item per sentence, documents through the "
                   "document index (BERT data; no EOD appended); an offline rule-based splitter (syntok)")
    p.set_defaults(func=cmd_preprocess)

    p = subparsers.add_parser("demo-sft", help="write the demo fine-tuning set (stdlib signatures): train/heldout")
    p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/train.jsonl and DIR/heldout.jsonl")
    p.add_argument("--limit-modules", type=int, default=None, help="only the first N stdlib modules (sorted)")
    p.set_defaults(func=cmd_demo_sft)

    p = subparsers.add_parser("merge-data", help="concatenate preprocessed datasets")
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX", help="prefixes to merge, in order")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("corpus", help="build the default corpus (Python stdlib docstrings) + tokenizer + data")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for corpus, tokenizer and PREFIX.bin/.idx")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192)")
    p.add_argument("--bert", action="store_true", help="for BERT: a lower-cased WordPiece and the corpus split into "
                   "sentences (preprocess --split-sentences)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: cores)")
    p.set_defaults(func=cmd_corpus)


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory (e.g. from `mtnlg tokenizer train`)")
    p.add_argument("--vocab-file", metavar="FILE", help="GPT-2 BPE encoder.json (with --merge-file), or alone a "
                   "BERT WordPiece vocab.txt")
    p.add_argument("--merge-file", metavar="vocab.bpe", help="GPT-2 BPE merges (with --vocab-file)")
    _add_case_args(p, "a vocab.txt: ")


def _add_case_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lower-case", dest="lower_case", action="store_true", default=None,
                   help=f"{what}lower-case the text (BertWordPieceLowerCase)")
    g.add_argument("--cased", dest="lower_case", action="store_false",
                   help=f"{what}keep case (BertWordPieceCase); default: lower-case when the vocab has no capitals")


def check_output_dir(path: str, flag: str) -> None:
    """Refuse, before any work, an output directory that cannot be written (a file, under a file, read-only)."""
    problem = dir_problem(path)
    if problem:
        raise UserError(f"{flag} {path}: {problem}; name a directory you can write")


def check_output_prefix(prefix: str, flag: str = "--output-prefix") -> None:
    """Refuse an output PREFIX whose directory cannot be written."""
    problem = dir_problem(os.path.dirname(os.path.abspath(prefix)))
    if problem:
        raise UserError(f"{flag} {prefix}: {problem}; name a prefix in a directory you can write")


def _tokenizer_from_args(args: argparse.Namespace):
    from mtnlg.data.tokenizer import load_tokenizer

    if args.tokenizer is None and args.vocab_file is None and args.merge_file is None:
        raise UserError("no tokenizer given; pass --tokenizer DIR or --vocab-file encoder.json --merge-file vocab.bpe "
                        "(GPT-2 BPE) or --vocab-file vocab.txt (BERT WordPiece)")
    if args.tokenizer is not None and (args.vocab_file or args.merge_file):
        raise UserError("pass either --tokenizer or --vocab-file/--merge-file, not both")
    if args.lower_case is not None and (args.vocab_file is None or args.merge_file is not None):
        raise UserError("--lower-case/--cased apply to a BERT --vocab-file vocab.txt only (a tokenizer directory "
                        "keeps its own setting)")
    return load_tokenizer(args.tokenizer, args.vocab_file, args.merge_file, lower_case=args.lower_case)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from mtnlg.data.readers import iter_documents
    from mtnlg.data.tokenizer import train_tokenizer

    check_output_dir(args.output, "--output")
    docs = iter_documents(args.input, args.json_key)
    if args.type == "wordpiece":
        from mtnlg.data.wordpiece import train_wordpiece

        if args.vocab_extra_ids:
            raise UserError("--vocab-extra-ids (T5 sentinels) applies to --type bpe only")
        lower = True if args.lower_case is None else args.lower_case
        tok = train_wordpiece(docs, args.vocab_size, args.output, lower, args.min_frequency)
        print(f"tokenizer: wrote {args.output} (WordPiece, vocab {tok.vocab_size}, "
              f"{'lower-case' if lower else 'cased'}; [CLS] {tok.cls_id} [SEP] {tok.sep_id} [MASK] {tok.mask_id} "
              f"[PAD] {tok.pad_id} [UNK] {tok.unk_id}; vocab.txt for --vocab-file)")
        return 0
    if args.lower_case is not None:
        raise UserError("--lower-case/--cased apply to --type wordpiece only")
    if args.vocab_extra_ids < 0:
        raise UserError(f"--vocab-extra-ids {args.vocab_extra_ids} must be >= 0 (T5 uses 100)")
    tok = train_tokenizer(docs, args.vocab_size, args.output, args.min_frequency, args.vocab_extra_ids)
    extra = ""
    if args.vocab_extra_ids:
        s = tok.sentinel_ids
        extra = f", <pad> = {tok.pad_id}, <extra_id_0> = {s[0]} ... <extra_id_{len(s) - 1}> = {s[-1]}"
    print(f"tokenizer: wrote {args.output} (vocab {tok.vocab_size}, <|endoftext|> = {tok.eod_id}{extra})")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from mtnlg.data.preprocess import preprocess

    check_output_prefix(args.output_prefix)
    tokenizer = _tokenizer_from_args(args)
    if args.sft:
        from mtnlg.data.sft import preprocess_sft

        if args.skip_bad_lines:
            raise UserError("--skip-bad-lines applies to plain documents, not --sft data: fix the named line instead")

        if args.split_sentences:
            raise UserError("--split-sentences applies to plain documents, not --sft data")
        preprocess_sft(args.input, tokenizer, args.output_prefix, args.max_length, args.overflow)
        return 0
    if args.max_length is not None:
        raise UserError("--max-length applies to --sft data only")
    preprocess(args.input, args.json_key, tokenizer, args.output_prefix, args.workers, args.skip_bad_lines,
               split_sentences=args.split_sentences)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from mtnlg.data.indexed import IndexedDataset
    from mtnlg.data.preprocess import merge

    check_output_prefix(args.output_prefix)
    merge(args.input, args.output_prefix)
    out = IndexedDataset(args.output_prefix)
    print(f"merge-data: wrote {out.prefix}.bin/.idx: {out.num_documents:,} documents, {out.num_tokens:,} tokens")
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from mtnlg.data.corpus import ensure_default_bert_data, ensure_default_data

    check_output_dir(args.output, "--output")
    build = ensure_default_bert_data if args.bert else ensure_default_data
    prefix, tokenizer_dir = build(args.output, vocab_size=args.vocab_size, workers=args.workers)
    print(f"corpus: data.prefix = {prefix}")
    print(f"corpus: data.tokenizer = {tokenizer_dir}")
    return 0



def cmd_demo_sft(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mtnlg.data.demo_sft import write_demo_sft

    check_output_dir(args.output, "--output")
    for name, s in write_demo_sft(args.output, limit_modules=args.limit_modules).items():
        print(f"demo-sft: {Path(args.output) / (name + '.jsonl')}: " + ", ".join(f"{v:,} {k}" for k, v in s.items()))
    return 0
