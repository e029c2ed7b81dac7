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
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    t = tsub.add_parser("train", help="train a byte-level BPE (with <|endoftext|>) on .jsonl/.txt/.parquet/.arrow "
                        "files or saved HF datasets")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="training text (files or dataset dirs)")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. 256 bytes and EOD")
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
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: cores)")
    p.set_defaults(func=cmd_corpus)


def _add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory (e.g. from `mtnlg tokenizer train`)")
    p.add_argument("--vocab-file", metavar="encoder.json", help="GPT-2 BPE vocabulary (with --merge-file)")
    p.add_argument("--merge-file", metavar="vocab.bpe", help="GPT-2 BPE merges (with --vocab-file)")


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
        raise UserError("no tokenizer given; pass --tokenizer DIR or --vocab-file encoder.json --merge-file vocab.bpe")
    if args.tokenizer is not None and (args.vocab_file or args.merge_file):
        raise UserError("pass either --tokenizer or --vocab-file/--merge-file, not both")
    return load_tokenizer(args.tokenizer, args.vocab_file, args.merge_file)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from mtnlg.data.readers import iter_documents
    from mtnlg.data.tokenizer import train_tokenizer

    check_output_dir(args.output, "--output")
    if args.vocab_extra_ids < 0:
        raise UserError(f"--vocab-extra-ids {args.vocab_extra_ids} must be >= 0 (T5 uses 100)")
    tok = train_tokenizer(iter_documents(args.input, args.json_key), args.vocab_size, args.output, args.min_frequency,
                          args.vocab_extra_ids)
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

        preprocess_sft(args.input, tokenizer, args.output_prefix, args.max_length, args.overflow)
        return 0
    if args.max_length is not None:
        raise UserError("--max-length applies to --sft data only")
    preprocess(args.input, args.json_key, tokenizer, args.output_prefix, args.workers, args.skip_bad_lines)
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
    from mtnlg.data.corpus import ensure_default_data

    check_output_dir(args.output, "--output")
    prefix, tokenizer_dir = ensure_default_data(args.output, vocab_size=args.vocab_size, workers=args.workers)
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
