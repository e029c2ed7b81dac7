"""The evaluation subcommands of ``mtnlg``: evaluate, generate, lm-eval.

``add_commands(subparsers)`` registers them on the CLI (``mtnlg.cli``, the one entry point); each
handler takes the parsed args, returns an exit code and raises ``UserError`` for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mtnlg.argtypes import non_negative_float, non_negative_int, positive_int, probability
from mtnlg.errors import UserError
from mtnlg.files import write_atomic


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``evaluate``, ``generate`` and ``lm-eval`` on the mtnlg CLI."""
    p = subparsers.add_parser("evaluate", help="zero-shot perplexity / cloze / multiple-choice evaluation, or a "
                              "fine-tuned BERT model on a task (mnli, qqp, race, squad, classify, multiple-choice)")
    _add_model_args(p)
    p.add_argument("--task", required=True, metavar="TASK",
                   help=f"{', '.join(LM_TASKS)} (causal LMs), or a BERT task: {', '.join(bert_tasks())}")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="the examples (see mtnlg/eval/tasks.py)")
    p.add_argument("--output", metavar="results.json", help="also write the results here")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="perplexity window stride in tokens (default: half the context)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N examples")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="generate-match: longest answer (default 32)")
    p.add_argument("--labels", default=None, metavar="NAME,NAME,...",
                   help="BERT classify task: the label names in class order (default: the fine-tuning run's)")
    p.add_argument("--seq-length", type=positive_int, default=None,
                   help="BERT tasks: tokens per input (default: the model's seq_length / max_position_embeddings)")
    p.add_argument("--doc-stride", type=positive_int, default=128, help="squad: window stride in tokens (default 128)")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("generate", help="generate text with a KV cache (greedy or sampled)")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="sampling temperature; 0 = greedy, the most likely token each step (default 0)")
    p.add_argument("--top-k", type=non_negative_int, default=0,
                   help="sample only among the K most likely tokens; 0 = all (default 0)")
    p.add_argument("--top-p", type=probability, default=1.0,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P, in (0, 1]; "
                   "1 = all (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed of sampling (default: not seeded)")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("lm-eval", help="run lm-evaluation-harness with the `mtnlg` model registered",
                              add_help=False)
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")
    p.set_defaults(func=cmd_lm_eval)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR", help="an mtnlg checkpoint directory (any layout)")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the newest)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator if any)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _device(name: str | None) -> str:
    from mtnlg.eval.loading import default_device

    return name or default_device()


LM_TASKS = ("perplexity", "cloze", "choice", "generate-match")


def bert_tasks() -> list[str]:
    from mtnlg.tasks.registry import NAMES

    return list(NAMES)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task not in LM_TASKS:
        return cmd_evaluate_task(args)
    from mtnlg.eval.loading import open_model
    from mtnlg.eval.tasks import read_jsonl, run_task

    rows = read_jsonl(args.data)[: args.limit]
    generating = args.task == "generate-match"
    model = open_model(args.checkpoint, args.hf, args.iteration, _device(args.device), args.batch_size,
                       for_generation=generating)
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        if model.rank == 0 and (done == total or done % max(1, total // 10) == 0):
            eta = (time.time() - t0) / done * (total - done)
            print(f"[evaluate] {done}/{total} documents, ETA {eta:.0f}s", file=sys.stderr, flush=True)

    if generating:
        from mtnlg.eval.generate_match import generate_match

        if model.generator is None:
            raise UserError("generate-match needs pp = 1; run it in one process or with tensor parallelism only")
        results = generate_match(model.generator, rows, model.eod_id, args.max_new_tokens, args.batch_size, progress)
    else:
        kwargs = {"stride": args.stride, "progress": progress} if args.task == "perplexity" else {}
        results = run_task(args.task, model.scorer, rows, model.eod_id, **kwargs)
    results = {"task": args.task, "data": str(args.data), "model": args.checkpoint or args.hf, **results,
               "seconds": round(time.time() - t0, 2)}
    if model.rank == 0:
        print(json.dumps(results, indent=2))
        if args.output:
            write_atomic(args.output, json.dumps(results, indent=2) + "\n")
    return 0


def cmd_evaluate_task(args: argparse.Namespace) -> int:
    """``--task`` a BERT task: metrics and every example's prediction (mtnlg.tasks.evaluate)."""
    from mtnlg.tasks.evaluate import evaluate_task

    if args.task not in bert_tasks():
        raise UserError(f"--task {args.task!r} is not a task; choose one of {', '.join(LM_TASKS)} (causal LMs) or "
                        f"{', '.join(bert_tasks())} (fine-tuned BERT)")
    if args.output is None:
        raise UserError(f"--task {args.task} writes the metrics and every prediction to --output FILE; give it")
    labels = [x for x in args.labels.split(",") if x] if args.labels else None
    results = evaluate_task(args.task, args.data, args.output, args.checkpoint, args.hf, args.iteration,
                            _device(args.device), args.batch_size, labels, args.seq_length, args.doc_stride)
    print(json.dumps({k: results[k] for k in ("task", "data", "model", "metrics", "seconds")}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mtnlg.eval.loading import open_model

    model = open_model(args.checkpoint, args.hf, args.iteration, _device(args.device), for_generation=True)
    if model.generator is None:
        raise UserError("generation needs pp = 1; run it in one process or with tensor parallelism only")
    gen = model.generator
    prompts = [gen.encode(p) or [model.eod_id] for p in args.prompt]
    outs = gen.generate_ids(prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if model.rank == 0:
        for prompt, ids in zip(args.prompt, outs):
            text = gen.decode([t for t in ids if t != model.eod_id])
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": len(ids)}, ensure_ascii=False))
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval.__main__ as lm_main
    except ImportError:
        raise UserError("lm-evaluation-harness is not installed; pip install 'mtnlg[eval]' (or lm-eval)") from None
    import mtnlg.eval.lm_eval_model  # noqa: F401  registers the `mtnlg` model

    rest = [a for a in args.lm_eval_args if a != "--"]
    sys.argv = ["lm_eval", *rest]
    lm_main.cli_evaluate()
    return 0
