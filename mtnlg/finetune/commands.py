"""The ``finetune`` subcommand (also ``scripts/finetune.py`` under a launcher)."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from mtnlg.argtypes import positive_int

    p = subparsers.add_parser("finetune", help="fine-tune a BERT model on a downstream task (mnli, qqp, race, "
                              "squad, classify, multiple-choice); also under deepspeed/torchrun launchers")
    p.add_argument("--config", required=True, help="YAML run config (model, parallel, train: lr, batch sizes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=2e-5 (repeatable)")
    p.add_argument("--task", required=True, help="mnli, qqp, race, squad, classify or multiple-choice")
    p.add_argument("--train-data", required=True, metavar="PATH", help="the task's training file (or folder: race)")
    p.add_argument("--valid-data", required=True, metavar="PATH[,PATH...]",
                   help="validation files, comma-separated; each is scored after every epoch")
    p.add_argument("--pretrained", metavar="CKPT", default=None,
                   help="a BERT checkpoint (a run's checkpoint.save, any layout, or an import-hf output); "
                   "without it the model starts from random weights")
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the training data (default 3)")
    p.add_argument("--doc-stride", type=positive_int, default=128,
                   help="squad: tokens between the starts of a long context's windows (default 128)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from mtnlg.config import load_config
    from mtnlg.finetune.run import finetune
    from mtnlg.tasks.registry import get_task

    get_task(args.task)  # an unknown task: one line before the config is read
    valid = [p for p in args.valid_data.split(",") if p]
    finetune(load_config(args.config, args.overrides), args.task, args.train_data, valid, args.pretrained,
             args.epochs, args.doc_stride)
    return 0
