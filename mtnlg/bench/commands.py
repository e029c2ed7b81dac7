"""The ``mtnlg bench`` subcommand. ``add_commands(subparsers)`` registers it on the CLI (``mtnlg.cli``,
the one entry point): ``mtnlg bench --config RUN.yaml [--peer] ...``."""

from __future__ import annotations

import argparse

from mtnlg.errors import UserError


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type: ``"1,2,4"`` -> ``(1, 2, 4)``, positive integers only."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,2,4,8")
    return values


def _names(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in ("eager", "sdpa")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: give eager, sdpa or eager,sdpa")
    return values


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench`` on the mtnlg CLI."""
    p = subparsers.add_parser(
        "bench", help="training throughput/MFU benchmark (vs the HF+DeepSpeed peer with --peer), dp=2, pp/tp scaling")
    p.add_argument("--config", default=None, help="YAML run config (model, batch, precision, DeepSpeed JSON)")
    p.add_argument("--calibrate", action="store_true",
                   help="only measure this machine for `mtnlg plan --gpu cpu` (1-thread GEMM peak and efficiency, "
                        "memory-bound kernels, gloo collectives between 2 ranks): writes OUTPUT/calibration.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setup (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per setup (default 2)")
    p.add_argument("--peer", action="store_true", help="also time the same model as a Hugging Face model")
    p.add_argument("--output", default="bench_out", metavar="DIR", help="bench.json, bench.md, bench.png, logs/")
    p.add_argument("--precisions", default=None, metavar="LIST",
                   help="comma-separated, e.g. bf16,fp32 (default: the config's train.precision)")
    p.add_argument("--no-main", dest="main", action="store_false",
                   help="skip the one-rank mtnlg (and peer) runs; only the dp=2 and layout runs")
    p.add_argument("--no-dp", dest="dp", action="store_false",
                   help="skip the data-parallel runs (mtnlg and peer at dp=2, 2 ranks of 1 thread; on by default "
                        "with 2 cores or devices)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the memory section (activations with and without SP and recompute at tp=2, "
                        "recompute's step time, predicted vs measured peak per rank)")
    p.add_argument("--no-layouts", dest="layouts", action="store_false",
                   help="skip the pipeline (pp=2) and tensor (tp=2) scaling runs")
    p.add_argument("--peer-attn", type=_names, default=("eager", "sdpa"), metavar="LIST",
                   help="the peer's attention implementations to time, e.g. sdpa (default eager,sdpa); mtnlg is "
                        "compared against the fastest")
    p.add_argument("--micro-batches", type=int_list, default=(1, 2, 4, 8), metavar="LIST",
                   help="micro-batch counts m for the pipeline runs (default 1,2,4,8)")
    p.add_argument("--layout-micro-batch-size", type=int, default=1, help="micro batch size of the pipeline runs")
    p.add_argument("--layout-steps", type=int, default=None, help="timed steps of the layout runs (default --steps)")
    p.add_argument("--threads", type=int, default=None, help="threads of the one-rank runs (default: all cores)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from mtnlg.bench.runner import BenchError, BenchOptions, run

    if args.calibrate:
        from mtnlg.bench.calibrate import calibrate

        try:
            calibrate(args.output, log=lambda msg: print(f"bench: {msg}", flush=True))
        except RuntimeError as e:
            raise UserError(str(e).splitlines()[0]) from None
        return 0
    if args.config is None:
        raise UserError("give --config RUN.yaml (or --calibrate)")

    precisions = None
    if args.precisions:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        bad = [p for p in precisions if p not in ("fp32", "bf16", "fp16")]
        if bad:
            raise UserError(f"--precisions: {', '.join(bad)} unknown; use fp32, bf16 or fp16")
    opts = BenchOptions(config=args.config, overrides=args.overrides, steps=args.steps, warmup=args.warmup,
                        peer=args.peer, output=args.output, precisions=precisions, main=args.main,
                        dp=args.dp, memory=args.memory, layouts=args.layouts, peer_attns=args.peer_attn,
                        micro_batches=args.micro_batches, layout_micro_batch_size=args.layout_micro_batch_size,
                        layout_steps=args.layout_steps, threads=args.threads)
    try:
        run(opts)
    except BenchError as e:
        raise UserError(f"{e}\n(full worker logs under {args.output}/logs)") from None
    return 0

