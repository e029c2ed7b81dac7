"""The memory tables of docs/parallelism-and-memory.md: ``mtnlg bench``'s memory section (``mtnlg.bench.memory``)
on the two models the manual quotes, on this machine (CPU, one thread per rank, bf16):

    python benchmarks/memory_tables.py --output benchmarks/results/memory      # ~20 min on 2 cores

- activations and recompute time: a 4-layer GPT-2-style model, hidden 2048, 16 heads, seq 256, vocabulary 8192,
  micro batch 2, dropout 0.1 (sequence over hidden 0.125, near MT-NLG 530B's 0.1), at tp=2: the bytes autograd
  keeps per rank for recompute none / selective / full with and without SP, and the step times of the three
  recompute choices, interleaved (4 micro batches a step);
- peaks: a 4-layer GPT-2, hidden 512, 8 heads, seq 1024, the GPT-2 vocabulary, micro batch 2: each rank's peak of
  live tensors over a training step against the memory model, for the eight layouts of ``PEAK_ROWS``.

Writes ``memory.json`` and prints the figures as it goes (``bench: [memory] ...`` lines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtnlg.bench.memory import activations, peaks, recompute_time
from mtnlg.files import write_atomic

ACTIVATIONS = {"model": {"architecture": "gpt2", "num_layers": 4, "hidden_size": 2048, "num_attention_heads": 16,
                         "vocab_size": 8192, "seq_length": 256, "hidden_dropout": 0.1, "attention_dropout": 0.1},
               "train": {"micro_batch_size": 2, "global_batch_size": 2, "precision": "bf16"},
               "parallel": {}, "deepspeed_config": "ds_configs/zero1.json"}
PEAKS = {"model": {"architecture": "gpt2", "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
                   "vocab_size": 50257, "seq_length": 1024},
         "train": {"micro_batch_size": 2, "global_batch_size": 2, "precision": "bf16"},
         "parallel": {}, "deepspeed_config": "ds_configs/zero1.json"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="benchmarks/results/memory")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per recompute choice")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.output)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = {"activations_config": ACTIVATIONS, "peaks_config": PEAKS}
    result.update(activations(ACTIVATIONS, logs))
    result["recompute_time"] = recompute_time(ACTIVATIONS, args.steps, args.warmup, logs)
    result["peaks"] = peaks(PEAKS, args.warmup, logs)
    write_atomic(out / "memory.json", json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
