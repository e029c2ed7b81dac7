"""The `mtnlg` command, the one entry point (``mtnlg ...``, ``python -m mtnlg ...``). Each subcommand
lives with its feature, whose ``add_commands(subparsers)`` registers it here; this file only wires them up
(feature modules never import it).

A user error (``UserError``) prints one line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from mtnlg.errors import LostContact, UserError

# A quiet rank (see _quiet_rank) on the reporting rank's host waits at most this long for it to print the error:
# its exit makes their launcher stop them both, so the reporting rank must print first. It leaves as soon as that
# rank has printed (a marker file). A quiet rank on another host has no such race; it pauses briefly.
QUIET_RANK_EXIT_WAIT_S = 60.0
QUIET_RANK_REMOTE_PAUSE_S = 3.0


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.iters=100 (repeatable)")


def _cmd_model_info(args: argparse.Namespace) -> int:
    from mtnlg.config import load_config, resolve, to_dict
    from mtnlg.model.flops import describe
    from mtnlg.training.ds_config import load_ds_json, optimizer_kind, zero_stage
    from mtnlg.training.memory import format_memory, predict_memory

    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size is None:  # as `train` does: the vocabulary of the data's tokenizer
        from mtnlg.training.sources import data_tokenizer, with_vocab

        cfg = with_vocab(cfg, data_tokenizer(cfg))
    cfg = resolve(cfg, args.world_size)
    print(describe(cfg))
    ds = load_ds_json(cfg.deepspeed_config)
    stage = zero_stage(ds)
    stages = predict_memory(cfg, stage, optimizer_kind(ds), args.device, ds.get("zero_optimization"))
    print(format_memory(stages, stage))
    if cfg.distill is not None:
        from mtnlg.training.distill import format_teacher_memory, open_teacher, teacher_config, teacher_memory

        teacher = teacher_config(open_teacher(cfg.distill), cfg.model, cfg.parallel.tensor)
        mem = teacher_memory(teacher, cfg.train.micro_batch_size, cfg.parallel.tensor, cfg.train.precision,
                             args.device)
        print(format_teacher_memory(mem, teacher, stages[-1].total))
    if args.verbose:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mtnlg.config import load_config
    from mtnlg.parallel.distributed import comm_failure
    from mtnlg.training.loop import train

    try:
        summary = train(load_config(args.config, args.overrides))
    except Exception as e:  # a peer that died or hangs surfaces here as a failed collective
        message = comm_failure(e)
        if message is None:
            raise
        raise LostContact(message) from None
    return 0 if summary.iterations else 1


def _cmd_reshard(args: argparse.Namespace) -> int:
    from mtnlg.checkpoint.reshard import reshard

    reshard(args.checkpoint, args.output, args.iteration, args.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mtnlg import __version__
    from mtnlg.argtypes import positive_int

    parser = OneLineParser(
        prog="mtnlg", description="Train GPT models with 3D parallelism (Megatron TP x DeepSpeed PP x ZeRO DP), "
        "prepare data, convert to and from Hugging Face, evaluate and generate.")
    parser.add_argument("--version", action="version", version=f"mtnlg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model (also under deepspeed/torchrun launchers)")
    _add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)

    from mtnlg.bench.commands import add_commands as add_bench_commands
    from mtnlg.convert.commands import add_commands as add_convert_commands
    from mtnlg.curate.commands import add_commands as add_curate_commands
    from mtnlg.data.commands import add_commands as add_data_commands
    from mtnlg.eval.commands import add_commands as add_eval_commands
    from mtnlg.finetune.commands import add_commands as add_finetune_commands
    from mtnlg.plan.commands import add_commands as add_plan_commands
    from mtnlg.serve.commands import add_commands as add_serve_commands
    from mtnlg.tasks.commands import add_commands as add_task_commands

    add_data_commands(sub)
    add_convert_commands(sub)
    add_eval_commands(sub)
    add_bench_commands(sub)
    add_plan_commands(sub)
    add_serve_commands(sub)
    add_curate_commands(sub)
    add_task_commands(sub)
    add_finetune_commands(sub)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    csub.required = True
    r = csub.add_parser("reshard", help="make a checkpoint that resumes under any (tp, pp, dp) layout")
    r.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint directory (ZeRO stage >= 1)")
    r.add_argument("--output", required=True, metavar="DIR2", help="a new directory for the universal checkpoint")
    r.add_argument("--iteration", type=int, default=None, help="which checkpoint (default: the newest complete)")
    r.add_argument("--workers", type=positive_int, default=1, help="conversion processes (default 1)")
    r.set_defaults(func=_cmd_reshard)

    p = sub.add_parser("model-info", help="resolve a run config and print the model's size and layout")
    _add_config_args(p, required=False)
    p.add_argument("--world-size", type=positive_int, default=1, help="ranks to resolve the layout for (default 1)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="where it will train: picks the attention kernel the activations assume (default cuda)")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the resolved config")
    p.set_defaults(func=_cmd_model_info)
    return parser


def _select_accelerator() -> None:
    """Tell DeepSpeed to use the CPU when torch sees no accelerator (instead of a warning per rank)."""
    import os

    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.accelerator.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _quiet_known_warnings() -> None:
    import warnings

    # DeepSpeed's pipeline engine sends activations with broadcast_ on tensors that require grad
    # (harmless on the sending side) and uses a collective torch has renamed.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # before anything imports torch: --help and usage errors stay fast
    _select_accelerator()
    _quiet_known_warnings()
    had_group = _process_group() is not None  # a caller's (Python API, tests): not ours to destroy
    try:
        code = int(args.func(args) or 0)
        if not had_group:
            _release_process_group()
        return code
    except UserError as e:
        if not had_group and not isinstance(e, LostContact):  # with peers gone, teardown could wait on them
            _release_process_group()
        if _quiet_rank(e):
            _wait_for_report(e)
        else:
            print(f"mtnlg {args.command}: error: {e}", file=sys.stderr, flush=True)
            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                _first_on_this_host(_report_marker(e))  # tells this host's quiet ranks that it has been printed
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"mtnlg {args.command}: interrupted", file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> NoReturn:
    """The console entry (``mtnlg``, ``python -m mtnlg``, ``scripts/*.py``): ``main``, then exit with its code.

    A rank of a multi-process launch (``WORLD_SIZE`` > 1) exits without the interpreter's teardown, once its output
    is flushed and the ``atexit`` handlers have run: DeepSpeed keeps references to its process groups in module
    globals, so their gloo threads (two run loops and a TCP loop per group, five groups) outlive
    ``destroy_process_group``, and destroying them in teardown's arbitrary order aborted a rank now and then with
    "terminate called without an active exception" (exit 134) after a run that had saved and said goodbye."""
    code = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import atexit
        import logging

        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _release_process_group() -> None:
    """Destroy this process's torch.distributed group (if a command made one) before the interpreter exits: left to
    interpreter shutdown, its communication threads are destroyed while still joinable, which can abort the process
    with "terminate called without an active exception" (exit 134) instead of the command's own exit code."""
    dist = _process_group()
    try:
        if dist is not None:
            dist.destroy_process_group()
    except Exception:  # exiting anyway: the command's own outcome is what the user needs
        pass


def _process_group():
    """torch.distributed when this process has an initialised default group (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def _quiet_rank(e: UserError) -> bool:
    """Errors every rank of a launch raises alike (config errors, agreed checks): rank 0 alone reports them."""
    import os

    if isinstance(e, LostContact):
        return not _first_on_this_host("lost-contact")
    return e.on_every_rank and os.environ.get("RANK", "0") != "0"


def _report_marker(e: UserError) -> str:
    """The marker name of a reported error: the ranks that stay quiet about it wait for it (``_wait_for_report``)."""
    return "lost-contact-reported" if isinstance(e, LostContact) else "error-reported"


def _wait_for_report(e: UserError) -> None:
    """Leave once the reporting rank of this host has printed ``e`` (at most ``QUIET_RANK_EXIT_WAIT_S``). A fixed
    3-second pause was too short on a loaded machine: rank 0 reached the same error later, this rank's exit made the
    launcher stop the job first, and nothing was printed at all."""
    import time

    reporter_here = isinstance(e, LostContact) or os.environ.get("RANK", "0") == os.environ.get("LOCAL_RANK", "0")
    if not reporter_here:  # rank 0 runs under another host's launcher, which this rank's exit does not stop
        time.sleep(QUIET_RANK_REMOTE_PAUSE_S)
        return
    deadline = time.monotonic() + QUIET_RANK_EXIT_WAIT_S
    path = _marker_path(_report_marker(e))
    while time.monotonic() < deadline and not os.path.exists(path):
        time.sleep(0.05)
    time.sleep(0.2)  # the reporting rank's flushed line on its way through the launcher's pipe


def _marker_path(what: str) -> str:
    """A file in /dev/shm named by the local launcher's pid and the job's port (the ranks of a host share both)."""
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"mtnlg-{what}-{os.getuid()}-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}")


def _first_on_this_host(what: str) -> bool:
    """Whether this rank is the first of its launch on this host to ask (a file created exclusively in /dev/shm,
    named by the local launcher's pid and the job's port; the ranks of a host share both)."""
    path = _marker_path(what)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # cannot tell: speak
        return True
    _remove_stale_markers(os.path.dirname(path))
    return True


def _remove_stale_markers(base: str, older_than_s: float = 600.0) -> None:
    """Markers of jobs long over (their ranks waited a minute at most): removed by the next job that reports."""
    import glob
    import time

    for old in glob.glob(os.path.join(base, f"mtnlg-*-{os.getuid()}-*")):
        try:
            if time.time() - os.stat(old).st_mtime > older_than_s:
                os.unlink(old)
        except OSError:
            pass

