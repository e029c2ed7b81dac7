"""The ``mtnlg curate`` subcommand; ``add_commands(subparsers)`` registers it on the CLI."""

from __future__ import annotations

import argparse

from mtnlg.errors import UserError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("curate", help="deduplicate, quality-filter and decontaminate documents before "
                              "preprocess (one machine or a Ray cluster)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".jsonl, .txt, .parquet or .arrow files, or saved HF dataset directories")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="writes DIR/kept/*.jsonl, DIR/removed/*.jsonl, DIR/report.{json,md} (a rerun resumes)")
    p.add_argument("--config", metavar="YAML", help="a YAML file with a 'curate:' section (see docs/curate.md)")
    p.add_argument("--steps", help="comma-separated subset of quality,decontaminate,exact,near (default: the "
                   "config's, else all)")
    p.add_argument("--json-key", help="document key / column (default: the config's text_key, else text)")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=FILE",
                   help="an evaluation or downstream JSONL file to decontaminate against (repeatable); a NAME "
                   "starting with mnli, qqp, race or squad reads that task's own files (GLUE TSV, RACE, SQuAD JSON)")
    p.add_argument("--threshold", help="near-duplicate word 5-gram Jaccard threshold in (0, 1] (default 0.8)")
    p.add_argument("--shard-docs", type=int, help="documents per shard (default 2000)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--ray", metavar="HOST:PORT", help="run the per-shard work as tasks on this Ray cluster")
    p.add_argument("--tokenizer", metavar="DIR", help="also count tokens and write DIR/tokens/curated.bin/.idx")
    p.set_defaults(func=cmd_curate)


def cmd_curate(args: argparse.Namespace) -> int:
    from mtnlg.curate import config as cc
    from mtnlg.curate.pipeline import curate

    cfg = cc.load(args.config)
    if args.steps is not None:
        cfg.steps = cc.parse_steps(args.steps)
    if args.json_key:
        cfg.text_key = args.json_key
    if args.threshold is not None:
        try:
            value = float(args.threshold)
        except ValueError:
            raise UserError(f"--threshold {args.threshold}: expected a number in (0, 1]") from None
        cfg.near.threshold = cc.check_threshold(value)
    if args.shard_docs is not None:
        if args.shard_docs < 1:
            raise UserError(f"--shard-docs {args.shard_docs} must be >= 1")
        cfg.shard_docs = args.shard_docs
    for item in args.benchmark:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--benchmark {item}: expected NAME=FILE.jsonl")
        cfg.decontaminate.benchmarks[name] = path
    curate(args.input, args.output, cfg, workers=args.workers, ray_address=args.ray, tokenizer_dir=args.tokenizer)
    return 0
