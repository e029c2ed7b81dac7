"""The converter subcommands of ``mtnlg``: export-hf and import-hf.

``add_commands(subparsers)`` registers them on the CLI (``mtnlg.cli``, the one entry point); each
handler takes the parsed args, returns an exit code and raises ``UserError`` for bad input.
"""

from __future__ import annotations

import argparse

from mtnlg.errors import UserError
from mtnlg.files import dir_problem


def _check_output(path: str) -> None:
    problem = dir_problem(path)
    if problem:
        raise UserError(f"--output {path}: {problem}; name a directory you can write")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export-hf`` and ``import-hf`` on the mtnlg CLI."""
    p = subparsers.add_parser("export-hf", help="write a checkpoint (any tp/pp/dp/ZeRO layout) as a Hugging Face model")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint.save directory (or a global_stepN)")
    p.add_argument("--iteration", type=int, default=None, help="which global_stepN (default: the newest complete)")
    p.add_argument("--output", required=True, metavar="HF_DIR", help="directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weight dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the safetensors above this size (default 5GB)")
    p.add_argument("--weights", choices=["auto", "master", "module"], default="auto",
                   help="fp32 optimizer masters or module weights (default: masters when saved)")
    p.add_argument("--verify", action="store_true",
                   help="load the result with transformers and compare its logits with mtnlg's")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser("import-hf", help="turn a Hugging Face GPT-2/Llama (safetensors) into a checkpoint")
    p.add_argument("--model", required=True, metavar="HF_DIR", help="directory with config.json + *.safetensors")
    p.add_argument("--output", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override, e.g. --set parallel.tensor=2 --set parallel.pipeline=2 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(func=cmd_import_hf)


def cmd_export_hf(args: argparse.Namespace) -> int:
    from mtnlg.convert.hf_export import export_hf

    _check_output(args.output)
    r = export_hf(args.checkpoint, args.output, iteration=args.iteration, dtype=args.dtype,
                  max_shard_size=args.max_shard_size, verify=args.verify, source=args.weights,
                  overwrite=args.overwrite)
    print(f"export-hf: wrote {r.output} from iteration {r.iteration} ({r.source} weights, {args.dtype}): "
          f"{', '.join(r.files)}")
    if r.max_abs_diff is not None:
        print(f"export-hf: verify: max abs logit difference {r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g}) OK")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from mtnlg.checkpoint.tags import CONFIG_NAME
    from mtnlg.config import load_config
    from mtnlg.convert.hf_import import import_hf

    _check_output(args.output)
    out = import_hf(args.model, args.output, args.overrides, overwrite=args.overwrite)
    cfg = load_config(out / CONFIG_NAME)
    print(f"import-hf: wrote {out} ({cfg.model.architecture}, {cfg.model.num_layers} layers, "
          f"tensor={cfg.parallel.tensor}, pipeline={cfg.parallel.pipeline}); fine-tune with: "
          f"mtnlg train --config {out / CONFIG_NAME} "
          "--set checkpoint.save=DIR")
    return 0

