"""The main example, end to end, with the same commands a user types (run by scripts/run_example.sh):

  1. build the default corpus (Python stdlib docstrings), its BPE tokenizer and .bin/.idx
  2. train a small Llama-family GPT in a 3D layout (tensor 2 x pipeline 2) on 4 CPU ranks
  3. export it to Hugging Face format, verifying the logits
  4. evaluate perplexity on the held-out documents: mtnlg in its own layout, and the HF export
  5. generate a sample
  6. print a summary table and draw the loss curve (runs/example/loss.png)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def step(n: int, title: str) -> None:
    print(f"\n=== [{n}/6] {title}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, **kw)
    if proc.returncode != 0:
        sys.exit(f"main example: step failed (exit {proc.returncode}): {' '.join(str(c) for c in cmd)}")
    return proc


def held_out_documents(prefix: str, tokenizer_dir: str, split: str, out: Path) -> tuple[int, float]:
    """Write the test split's documents as JSONL text; return (documents, unigram entropy of the training split)."""
    import numpy as np

    from mtnlg.config import parse_split
    from mtnlg.data.gpt_dataset import split_ranges
    from mtnlg.data.indexed import IndexedDataset
    from mtnlg.data.tokenizer import load_tokenizer

    ds, tok = IndexedDataset(prefix), load_tokenizer(tokenizer_dir)
    (train_a, train_b), _, (test_a, test_b) = split_ranges(len(ds), parse_split(split))
    with open(out, "w") as f:
        for i in range(test_a, test_b):
            ids = [t for t in ds[i].tolist() if t != tok.eod_id]
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    counts = np.bincount(np.concatenate([ds[i] for i in range(train_a, train_b)]))
    q = counts[counts > 0] / counts.sum()
    return test_b - test_a, float(-(q * np.log(q)).sum())


def plot(metrics: Path, out: Path, unigram: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iteration"] for r in rows], [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["iteration"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.axhline(unigram, color="gray", linestyle="--", label="unigram entropy of the corpus")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("mtnlg main example: tp=2 x pp=2 on the stdlib docstring corpus")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=None, help="training iterations (default: examples/main.yaml)")
    ap.add_argument("--out", default="runs/example", help="output directory (default runs/example)")
    args = ap.parse_args()
    out = ROOT / args.out
    if out.exists():
        shutil.rmtree(out)  # a fresh run each time
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    times: dict[str, float] = {}
    t_all = time.time()

    step(1, "default corpus, tokenizer, preprocessing")
    t = time.time()
    data_dir = out / "data"
    run([BIN / "mtnlg", "corpus", "--output", data_dir, "--workers", "2"], env=env)
    prefix = str(next(data_dir.glob("stdlib-*.idx")).with_suffix(""))
    tokenizer = str(next(data_dir.glob("tokenizer-*")))
    held_out = out / "held_out.jsonl"
    n_docs, unigram = held_out_documents(prefix, tokenizer, "98,1,1", held_out)
    print(f"held-out test split: {n_docs} documents -> {held_out}; unigram entropy of the training split: "
          f"{unigram:.3f} nats/token")
    times["data"] = time.time() - t

    step(2, "train: deepspeed launcher, 4 ranks, tensor 2 x pipeline 2, ZeRO-1, bf16")
    t = time.time()
    ckpt = out / "ckpt"
    extra = ["--set", f"train.iters={args.iters}"] if args.iters else []
    run([BIN / "deepspeed", "--num_gpus", "4", "scripts/pretrain_gpt.py", "--config", "examples/main.yaml",
         "--set", f"data.prefix={prefix}", "--set", f"data.tokenizer={tokenizer}",
         "--set", f"checkpoint.save={ckpt}", *extra], env=env)
    times["train"] = time.time() - t
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    val = [r for r in records if "val_loss" in r][-1]

    step(3, "export to Hugging Face (LlamaForCausalLM) with --verify")
    t = time.time()
    hf = out / "hf"
    run([BIN / "mtnlg", "export-hf", "--checkpoint", ckpt, "--output", hf, "--verify"], env=env)
    times["export"] = time.time() - t

    step(4, "perplexity on the held-out split: mtnlg (tp 2 x pp 2, 4 ranks) and the HF export")
    t = time.time()
    native_json, hf_json = out / "ppl_mtnlg.json", out / "ppl_hf.json"
    run([BIN / "deepspeed", "--num_gpus", "4", "scripts/evaluate.py", "--checkpoint", ckpt, "--task", "perplexity",
         "--data", held_out, "--output", native_json], env=env)
    run([BIN / "mtnlg", "evaluate", "--hf", hf, "--task", "perplexity", "--data", held_out, "--output", hf_json],
        env=env)
    native, hf_res = json.loads(native_json.read_text()), json.loads(hf_json.read_text())
    times["evaluate"] = time.time() - t

    step(5, "generate (KV cache, top-k sampling)")
    t = time.time()
    proc = run([BIN / "mtnlg", "generate", "--checkpoint", ckpt, "--prompt", "Return the", "--max-new-tokens", "40",
                "--temperature", "0.8", "--top-k", "40", "--seed", "0"], env=env, capture_output=True, text=True)
    sample = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(sample, ensure_ascii=False))
    times["generate"] = time.time() - t

    step(6, "summary")
    png = out / "loss.png"
    drew = plot(ckpt / "metrics.jsonl", png, unigram)
    rel = abs(native["token_perplexity"] - hf_res["token_perplexity"]) / hf_res["token_perplexity"]
    rows = [
        ("layout", "tensor 2 x pipeline 2 x data 1 (4 ranks), ZeRO-1, bf16"),
        ("training", f"{last['iteration']} iterations, {last['consumed_samples'] * 128:,} tokens, "
                     f"{times['train']:.0f}s, {last['tokens_per_s']:.0f} tokens/s (last window)"),
        ("final train loss", f"{last['loss']:.3f} nats/token"),
        ("validation loss", f"{val['val_loss']:.3f} nats/token (iteration {val['iteration']})"),
        ("unigram entropy", f"{unigram:.3f} nats/token (a model that ignores context)"),
        ("held-out perplexity", f"mtnlg {native['token_perplexity']:.2f} | HF export {hf_res['token_perplexity']:.2f} "
                                f"(relative difference {rel:.1e})"),
        ("held-out bits/byte", f"mtnlg {native['bits_per_byte']:.3f} | HF export {hf_res['bits_per_byte']:.3f}"),
        ("word perplexity", f"mtnlg {native['word_perplexity']:.1f} | HF export {hf_res['word_perplexity']:.1f}"),
        ("sample", repr(sample["prompt"] + sample["completion"])[:110]),
        ("loss curve", str(png.relative_to(ROOT)) if drew else "(matplotlib not installed)"),
        ("wall time", f"{time.time() - t_all:.0f}s total: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v}")
    below = val["val_loss"] < unigram - 0.5
    agree = rel < 1e-3
    print(f"\nvalidation loss below the unigram entropy: {'yes' if below else 'NO'}; "
          f"mtnlg and HF perplexities agree: {'yes' if agree else 'NO'}")
    if not (below and agree and math.isfinite(last["loss"])):
        sys.exit(1)


if __name__ == "__main__":
    main()
