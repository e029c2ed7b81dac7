"""The ``mtnlg plan`` subcommand: ``add_commands(subparsers)`` registers it on the CLI (``mtnlg.cli``)."""

from __future__ import annotations

import argparse
import json
import sys

from mtnlg.argtypes import positive_int
from mtnlg.errors import UserError

RECOMPUTES = ("none", "selective", "full")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers, e.g. 1,2,4")
    return values


def _recomputes(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if not values or set(values) - set(RECOMPUTES):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more of {', '.join(RECOMPUTES)}")
    return values


def parse_layout(text: str) -> dict[str, object]:
    """``tp=8,pp=35[,mb=1,zero=1,sp=on,recompute=full]`` -> {"tensor": 8, "pipeline": 35, ...}."""
    names = {"tp": "tensor", "pp": "pipeline", "mb": "micro_batch_size", "zero": "zero_stage",
             "sp": "sequence_parallel", "recompute": "recompute"}
    out: dict[str, object] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise UserError(f"--layout {text!r}: '{item}' is not KEY=VALUE with KEY one of {', '.join(names)}")
        if key == "sp":
            if value not in ("on", "off"):
                raise UserError(f"--layout sp={value}: use sp=on or sp=off")
            out[names[key]] = value == "on"
        elif key == "recompute":
            if value not in RECOMPUTES:
                raise UserError(f"--layout recompute={value}: use one of {', '.join(RECOMPUTES)}")
            out[names[key]] = value
        else:
            try:
                number = int(value)
            except ValueError:
                raise UserError(f"--layout {key}={value}: not an integer") from None
            if number < (0 if key == "zero" else 1):
                raise UserError(f"--layout {key}={value}: out of range")
            out[names[key]] = number
    if "tensor" not in out or "pipeline" not in out:
        raise UserError(f"--layout {text!r}: give at least tp=T,pp=P")
    return out


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plan`` on the mtnlg CLI."""
    p = subparsers.add_parser(
        "plan", help="rank (tp, pp, dp, micro batch, ZeRO, SP, recompute) layouts for a cluster by predicted speed")
    p.add_argument("--config", required=True, help="YAML run config (the model; precision and DeepSpeed JSON)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--nodes", type=int, required=True, help="nodes of the cluster")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (or CPU ranks) per node")
    p.add_argument("--gpu", required=True, metavar="NAME", help="A100-40GB, A100-80GB, H100-80GB, H200 or cpu")
    p.add_argument("--global-batch-size", type=positive_int, default=None,
                   help="sequences per step (default: the config's train.global_batch_size)")
    p.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    p.add_argument("--json", action="store_true", help="print the ranked layouts as a JSON list instead")
    p.add_argument("--layout", default=None, metavar="SPEC",
                   help="score one layout: tp=T,pp=P[,mb=M,zero=Z,sp=on|off,recompute=R] (the rest searched)")
    p.add_argument("--write", default=None, metavar="DIR",
                   help="write DIR/run.yaml and DIR/ds_config.json for the best (or --layout's) layout")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="--gpu cpu: figures measured by `mtnlg bench --calibrate` (default: the built-in ones)")
    g = p.add_argument_group("hardware overrides")
    for flag, field, text in [
        ("--gpu-memory-gb", "memory_gib", "memory per GPU, GiB"),
        ("--reserved-gb", "reserved_gib", "memory per GPU the model cannot use, GiB"),
        ("--peak-tflops", "peak_bf16_tflops", "dense 16-bit peak per GPU, TFLOP/s"),
        ("--peak-fp32-tflops", "peak_fp32_tflops", "fp32 peak per GPU, TFLOP/s"),
        ("--memory-gbps", "memory_gbps", "memory bandwidth per GPU, GB/s"),
        ("--intra-node-gbps", "intra_node_gbps", "GPU-to-GPU bandwidth inside a node, GB/s per direction"),
        ("--inter-node-gbps", "inter_node_gbps", "each GPU's network bandwidth between nodes, GB/s (bytes)"),
        ("--gemm-efficiency", "gemm_efficiency", "fraction of the peak a transformer's GEMMs reach"),
        ("--link-efficiency", "link_efficiency", "fraction of the link bandwidths collectives reach"),
    ]:
        g.add_argument(flag, dest=f"hw_{field}", type=float, default=None, help=text)
    s = p.add_argument_group("search space (default: everything the rules allow)")
    s.add_argument("--tensor", type=_ints, default=None, metavar="LIST", help="tp sizes, e.g. 4,8")
    s.add_argument("--pipeline", type=_ints, default=None, metavar="LIST", help="pp sizes")
    s.add_argument("--micro-batch-size", type=_ints, default=None, metavar="LIST", help="micro batch sizes")
    s.add_argument("--zero", type=_ints, default=None, metavar="LIST", help="ZeRO stages")
    s.add_argument("--sequence-parallel", choices=("on", "off", "both"), default="both")
    s.add_argument("--recompute", type=_recomputes, default=None, metavar="LIST", help="none, selective, full")
    s.add_argument("--any-software", action="store_true",
                   help="also score settings DeepSpeed cannot run (e.g. ZeRO-0 with fp16, optimizer states "
                        "replicated as in Megatron-LM 2021); never with --write")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from mtnlg.config import load_config
    from mtnlg.plan.hardware import hardware
    from mtnlg.plan.output import report, write_run
    from mtnlg.plan.planner import Choices, Cluster, plan

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be positive")
    if args.top < 1:
        raise UserError("--top must be positive")
    if args.write and args.any_software:
        raise UserError("--write needs a layout mtnlg can run: drop --any-software")
    overrides = {k[3:]: v for k, v in vars(args).items() if k.startswith("hw_")}
    hw = hardware(args.gpu, overrides, args.calibration)
    base = _base_config(load_config(args.config, args.overrides))
    gbs = args.global_batch_size if args.global_batch_size is not None else base.train.global_batch_size
    if not gbs or gbs < 1:
        raise UserError("give --global-batch-size (the config sets no train.global_batch_size)")
    sp = {"on": (True,), "off": (False,), "both": None}[args.sequence_parallel]
    fixed = parse_layout(args.layout) if args.layout else {}
    choices = Choices(
        tensor=(fixed["tensor"],) if "tensor" in fixed else args.tensor,
        pipeline=(fixed["pipeline"],) if "pipeline" in fixed else args.pipeline,
        micro_batch_size=(fixed["micro_batch_size"],) if "micro_batch_size" in fixed else args.micro_batch_size,
        zero_stage=(fixed["zero_stage"],) if "zero_stage" in fixed else args.zero,
        sequence_parallel=(fixed["sequence_parallel"],) if "sequence_parallel" in fixed else sp,
        recompute=(fixed["recompute"],) if "recompute" in fixed else args.recompute,
        runnable_only=not args.any_software)
    cluster = Cluster(args.nodes, args.gpus_per_node)
    result = plan(base, hw, cluster, gbs, choices)
    best = result.best_per_family()
    if args.json:
        print(json.dumps([s.row() for s in best[: args.top]], indent=1))
    else:
        print(report(result, hw, cluster.world, args.top))
    if not best:
        what = f"--layout {args.layout}: no such layout fits" if args.layout else \
            f"no layout fits this model on {cluster.world} GPUs"
        fix = "" if args.layout else "; add nodes, or GPUs with more memory"
        raise UserError(f"{what} (reasons above){fix}" if not args.json else
                        f"{what}: " + "; ".join(f"{', '.join(f)}: {r}" for r, f in result.rejected.items()) + fix)
    if args.write:
        paths = write_run(base, best[0], gbs, args.write)
        print(f"wrote {paths[0]} and {paths[1]} ({best[0].layout.label()})", file=sys.stderr if args.json else None)
    return 0


def _base_config(cfg):
    """The run config with a vocabulary size (from the data's tokenizer when the YAML has none)."""
    if cfg.model.vocab_size is None:
        from mtnlg.training.sources import data_tokenizer, with_vocab

        cfg = with_vocab(cfg, data_tokenizer(cfg))
    return cfg
