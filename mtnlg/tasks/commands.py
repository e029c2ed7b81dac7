"""``mtnlg demo-tasks``: write the offline demonstration set of every BERT task format (mtnlg.tasks.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo-tasks", help="write a small set in each BERT task format (mnli, qqp, race, "
                              "squad, classify, multiple-choice) from the stdlib docstrings, offline")
    p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/<task>/... in each task's format")
    p.add_argument("--limit-modules", type=int, default=None, help="only the first N stdlib modules (sorted)")
    p.add_argument("--max-examples", type=int, default=2000, help="training examples per task (dev: a fifth)")
    p.set_defaults(func=cmd_demo_tasks)


def cmd_demo_tasks(args: argparse.Namespace) -> int:
    from mtnlg.data.commands import check_output_dir
    from mtnlg.errors import UserError
    from mtnlg.tasks.demo import write_demo_tasks

    if args.max_examples < 1:
        raise UserError(f"--max-examples {args.max_examples} must be >= 1")
    check_output_dir(args.output, "--output")
    for task, n in write_demo_tasks(args.output, limit_modules=args.limit_modules,
                                    max_examples=args.max_examples).items():
        print(f"demo-tasks: {Path(args.output) / task}: {n['train']:,} train, {n['dev']:,} dev examples")
    return 0
