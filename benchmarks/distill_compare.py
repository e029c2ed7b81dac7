"""Distillation against plain training, on the default corpus (Python stdlib docstrings, BPE 8192):

  1. pretrain a teacher: the main example's model (examples/main.yaml: Llama-family, 4 layers, hidden 192)
  2. train a student with half its layers (2) on the same data for S steps: once plain, once distilled from the
     teacher (distill: {teacher, temperature, alpha}); same seed, same batches, same schedule
  3. held-out perplexity of all three on the test split's documents (`mtnlg evaluate --task perplexity`)

    python benchmarks/distill_compare.py                      # defaults below, ~30 min on 2 CPU cores
    python benchmarks/distill_compare.py --ranks 4            # the students in tensor 2 x pipeline 2 (deepspeed)

Writes benchmarks/results/distill/distill.json and distill.md (``--results``), and exits 1 unless the distilled
student's held-out perplexity is below the plain student's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "examples"))
from main_example import held_out_documents  # noqa: E402  (the main example's held-out split, reused)


def run(cmd: list, env: dict) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"distill_compare: failed (exit {proc.returncode}): {' '.join(str(c) for c in cmd)}")


def train(ranks: int, sets: list[str], env: dict) -> float:
    """One `mtnlg train` of examples/main.yaml with ``sets`` overrides (4 ranks: tensor 2 x pipeline 2 under the
    deepspeed launcher; 1: one process); returns the wall time."""
    t = time.time()
    overrides = [a for s in sets for a in ("--set", s)]
    if ranks == 1:
        run([BIN / "mtnlg", "train", "--config", "examples/main.yaml", "--set", "parallel.tensor=1",
             "--set", "parallel.pipeline=1", *overrides], env)
    else:
        run([BIN / "deepspeed", "--num_gpus", ranks, "scripts/pretrain_gpt.py", "--config", "examples/main.yaml",
             *overrides], env)
    return time.time() - t


def perplexity(ckpt: Path, held_out: Path, out: Path, env: dict) -> float:
    run([BIN / "mtnlg", "evaluate", "--checkpoint", ckpt, "--task", "perplexity", "--data", held_out,
         "--output", out], env)
    return json.loads(out.read_text())["token_perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/distill", help="working directory (default runs/distill)")
    ap.add_argument("--results", default="benchmarks/results/distill", help="where the JSON and table go")
    ap.add_argument("--teacher-iters", type=int, default=300)
    ap.add_argument("--student-iters", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=1, choices=[1, 4], help="1 process, or tensor 2 x pipeline 2")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--teacher", default=None, help="reuse this teacher checkpoint instead of training one")
    args = ap.parse_args()
    out = ROOT / args.out
    env = {**os.environ, "OMP_NUM_THREADS": "1" if args.ranks > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
           "HF_HUB_OFFLINE": "1"}
    times: dict[str, float] = {}

    data = out / "data"
    run([BIN / "mtnlg", "corpus", "--output", data, "--workers", "2"], env)
    prefix = str(next(data.glob("stdlib-*.idx")).with_suffix(""))
    tokenizer = str(next(data.glob("tokenizer-*")))
    held_out = out / "held_out.jsonl"
    n_docs, _ = held_out_documents(prefix, tokenizer, "98,1,1", held_out)
    common = [f"data.prefix={prefix}", f"data.tokenizer={tokenizer}", "train.eval_interval=0"]

    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not args.teacher:
        shutil.rmtree(teacher, ignore_errors=True)
        times["teacher"] = train(args.ranks, [*common, f"train.iters={args.teacher_iters}",
                                              f"checkpoint.save={teacher}", "checkpoint.interval=0"], env)
    student = [*common, "model.num_layers=2", f"train.iters={args.student_iters}", "checkpoint.interval=0",
               f"train.warmup_iters={max(1, args.student_iters // 20)}"]
    runs = {"plain": [], "distilled": [f"distill.teacher={teacher}", f"distill.temperature={args.temperature}",
                                       f"distill.alpha={args.alpha}"]}
    ppl = {}
    for name, extra in runs.items():
        ckpt = out / f"student_{name}"
        shutil.rmtree(ckpt, ignore_errors=True)
        times[f"student_{name}"] = train(args.ranks, [*student, f"checkpoint.save={ckpt}", *extra], env)
        ppl[f"student_{name}"] = perplexity(ckpt, held_out, out / f"ppl_{name}.json", env)
    ppl["teacher"] = perplexity(teacher, held_out, out / "ppl_teacher.json", env)

    layout = "tensor 2 x pipeline 2 (4 ranks)" if args.ranks == 4 else "1 process"
    result = {
        "held_out_documents": n_docs, "layout": layout, "precision": "bf16",
        "teacher": {"layers": 4, "iters": int((teacher / "latest").read_text().strip().removeprefix("global_step"))},
        "student": {"layers": 2, "iters": args.student_iters},
        "distill": {"temperature": args.temperature, "alpha": args.alpha},
        "token_perplexity": ppl, "seconds": {k: round(v) for k, v in times.items()},
        "command": " ".join(sys.argv),
    }
    res = ROOT / args.results
    res.mkdir(parents=True, exist_ok=True)
    (res / "distill.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [("teacher (4 layers)", ppl["teacher"]), ("student, plain (2 layers)", ppl["student_plain"]),
            ("student, distilled (2 layers)", ppl["student_distilled"])]
    table = ["| model | held-out token perplexity |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in rows]
    note = (f"{layout}, bf16; teacher {result['teacher']['iters']} steps, students {args.student_iters} steps on "
            f"the same batches; T = {args.temperature}, alpha = {args.alpha}; {n_docs} held-out documents. "
            f"Command: `python {' '.join(sys.argv)}`")
    (res / "distill.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    print("\n".join(table) + "\n\n" + note)
    if not ppl["student_distilled"] < ppl["student_plain"]:
        sys.exit("distilled student is NOT better than the plain one")


if __name__ == "__main__":
    main()
