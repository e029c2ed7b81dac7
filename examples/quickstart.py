"""The Python API in one page: build a GPT from a config dict, train it a little, sample from it.

    python examples/quickstart.py [--architecture gpt2|llama|mistral|qwen2] [--steps 60] [--bf16]

One process, no launcher, CPU or GPU. The data is a toy stream (each sequence counts up
from a random start, modulo the vocabulary) so the loss visibly falls within a minute.
"""

from __future__ import annotations

import argparse
import time

import torch

from mtnlg.model import GPTModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--architecture", default="llama", choices=["gpt2", "llama", "mistral", "qwen2"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()

    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    model = GPTModel.from_config(
        {"architecture": args.architecture, "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
         "vocab_size": 256, "seq_length": 64},
        seed=0,
    ).to(device, torch.bfloat16 if args.bf16 else torch.float32)
    print(f"{args.architecture}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        start = torch.randint(0, 256, (16, 1), generator=gen)
        tokens = ((start + torch.arange(65)) % 256).to(device)  # (B, T+1)
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  ({time.time() - t0:.1f}s)")

    model.eval()
    ids = torch.tensor([[10, 11, 12]], device=device)
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    print("greedy continuation of [10, 11, 12]:", ids[0].tolist())


if __name__ == "__main__":
    main()
