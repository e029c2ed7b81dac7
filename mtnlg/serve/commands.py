"""``mtnlg serve``: an OpenAI-compatible HTTP server over a native checkpoint (any layout; tensor-parallel under
``torchrun``/``deepspeed``: rank 0 serves HTTP, every rank steps the model) or a Hugging Face directory.

    mtnlg serve --checkpoint runs/x --port 8000
    torchrun --nproc_per_node 2 -m mtnlg serve --checkpoint runs/x     # tensor parallel, 2 ranks
"""

from __future__ import annotations

import argparse
import signal
import sys

from mtnlg.errors import UserError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--checkpoint", metavar="DIR", help="an mtnlg checkpoint directory (any layout)")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory (imported to a temporary mtnlg "
                   "checkpoint, then served by the same batched engine)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the directory's name)")
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together (cache rows; default 64)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="KV budget: prompt + answer tokens of all running sequences (default: rows x context)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting for a row before 429 (default 256)")
    p.add_argument("--max-n", type=int, default=16, help="largest `n` a request may ask for (default 16)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for running requests to finish (default 60)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator if any)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def _check(args: argparse.Namespace) -> None:
    if (args.checkpoint is None) == (args.hf is None):
        raise UserError("give exactly one of --checkpoint DIR (an mtnlg checkpoint) or --hf DIR (a Hugging Face model)")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number (0-65535)")
    for name in ("max_batch_size", "max_n"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise UserError("--max-queue must be 0 or more")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 2:
        raise UserError("--max-batch-tokens must be at least 2 (one prompt token and one answer token)")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("mtnlg serve needs starlette and uvicorn: pip install 'mtnlg[serve]'") from None


def cmd_serve(args: argparse.Namespace) -> int:
    _check(args)
    from mtnlg.eval.loading import default_device
    from mtnlg.serve.model_runner import open_runner

    runner, info = open_runner(args.checkpoint, args.hf, args.device or default_device(), args.max_batch_size,
                               args.model_name)
    if info.rank != 0:
        # a launcher passes SIGTERM to every rank: rank 0 drains and then tells the others to stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        runner.follow()
        return 0
    return _serve(args, runner, info)


def _serve(args: argparse.Namespace, runner, info) -> int:
    import uvicorn

    from mtnlg.serve.api import Server
    from mtnlg.serve.engine import Engine
    from mtnlg.serve.metrics import Metrics

    budget = args.max_batch_tokens or args.max_batch_size * info.context
    engine = Engine(runner, info, args.max_batch_size, budget, args.max_queue, Metrics())
    server = Server(engine, min(args.max_n, args.max_batch_size))
    config = uvicorn.Config(server.app(), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="off")
    web = _DrainingServer(config)
    engine.start()
    tp = f", tensor parallel over {info.world} ranks" if info.world > 1 else ""
    print(f"mtnlg serve: {info.name} on http://{args.host}:{args.port}/v1 (context {info.context}, "
          f"{args.max_batch_size} rows, KV budget {budget} tokens{tp})", file=sys.stderr, flush=True)
    try:
        web.run()
    finally:
        engine.stop()
    if engine.error is not None:
        raise UserError(f"the engine stopped: {engine.error}")
    print("mtnlg serve: stopped", file=sys.stderr, flush=True)
    return 0


class _DrainingServer:
    """uvicorn's Server, except that SIGTERM/SIGINT end in exit status 0 after the drain: uvicorn (>= 0.29)
    re-raises the signal it caught once it has shut down, which would end the process with -15."""

    def __new__(cls, config):
        import uvicorn

        class Drain(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                if sig in (signal.SIGTERM, signal.SIGINT) and not self.should_exit:
                    print("mtnlg serve: draining (no new connections; running requests finish)",
                          file=sys.stderr, flush=True)
                    self.should_exit = True
                    return
                super().handle_exit(sig, frame)

        return Drain(config)
