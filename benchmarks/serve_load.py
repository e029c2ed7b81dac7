"""`mtnlg serve` (native checkpoint) against `transformers serve` (its HF export, with and without
`--continuous-batching`), the same load side by side in one run:

  1. a random Llama-family model (--layers, --hidden; a byte-level BPE trained here) written as an HF directory,
     imported as an mtnlg checkpoint (`import-hf`) and exported back (`export-hf`): both servers load the same
     weights
  2. each server in turn on 127.0.0.1; for each concurrency (default 1, 8, 32) the same requests (mixed prompt
     lengths 8-128 tokens, answers 16-96 tokens), at most `concurrency` in flight, each streamed
  3. output tokens/s, time to first token and inter-token latency p50/p99 per server and concurrency

    python benchmarks/serve_load.py                          # ~10-20 min on 2 CPU cores
    python benchmarks/serve_load.py --concurrency 1 8 --requests-per-level 16 --layers 2   # a quick look

Needs `transformers serve`'s own dependencies (pip install fastapi accelerate). Inter-token latency is measured
between streamed chunks that carry text. Writes
benchmarks/results/serve/serve_load.json and serve_load.md (--results). A benchmark prints figures; nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or has had "
         "not but first new after also one two their time who into its other all can more most between during "
         "city year school state may such world over three only part under these about than when used later").split()


def build_model(d: Path, layers: int, hidden: int, context: int) -> tuple[Path, Path]:
    import torch
    import transformers

    from mtnlg.convert.hf_export import export_hf
    from mtnlg.convert.hf_import import import_hf
    from mtnlg.data.tokenizer import train_tokenizer

    ckpt, hf = d / "native", d / "hf"
    if (hf / "config.json").is_file() and (ckpt / "latest").is_file():
        return ckpt, hf
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(2000)]
    tok = train_tokenizer(docs, 1024, d / "tok")
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=hidden * 8 // 3 // 32 * 32,
        vocab_size=len(tok.hf), max_position_embeddings=context, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.02,
        bos_token_id=None, eos_token_id=None)  # no end token: every answer runs to its max_tokens on both servers
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "src")
    tok.hf.save_pretrained(d / "src")
    import_hf(d / "src", ckpt, overwrite=True)
    export_hf(str(ckpt), str(hf), verify=True)
    return ckpt, hf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], port: int, log: Path, timeout: float = 300.0) -> subprocess.Popen:
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{argv[0]} did not answer /health in {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def requests_for(n: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs: prompts of ~8-128 tokens, answers of 16-96 tokens."""
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 128))), rng.randint(16, 96)) for _ in range(n)]


async def one(client, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    t0 = time.perf_counter()
    stamps = []
    usage = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.completion_tokens
    if not stamps:
        raise RuntimeError("no tokens came back")
    # tokens: the server's usage count when it sends one (a chunk may carry several tokens, or none)
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": usage if usage is not None else len(stamps)}


async def level(base: str, model: str, reqs: list[tuple[str, int]], concurrency: int, extra: dict) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=1800)
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt, max_tokens):
        async with gate:
            return await one(client, model, prompt, max_tokens, extra)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(gated(p, m) for p, m in reqs))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(reqs), "output_tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
            "itl_p50_ms": ms(pct(itl, 50)), "itl_p99_ms": ms(pct(itl, 99))}


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def ms(x: float) -> float:
    return round(1000 * x, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/mtnlg_serve_load")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "serve"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: 2 x concurrency, at least 8")
    ap.add_argument("--servers", nargs="+", default=["mtnlg", "transformers", "transformers-cb"],
                    choices=["mtnlg", "transformers", "transformers-cb"])
    args = ap.parse_args()
    work, out = Path(args.workdir), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, hf = build_model(work, args.layers, args.hidden, args.context)
    rows = []
    for name in args.servers:
        port = free_port()
        if name == "mtnlg":
            argv = [str(BIN / "mtnlg"), "serve", "--checkpoint", str(ckpt), "--port", str(port),
                    "--max-batch-size", str(max(args.concurrency)), "--model-name", "m"]
            model, extra = "m", {"ignore_eos": True}
        else:
            argv = [str(BIN / "transformers"), "serve", str(hf), "--port", str(port), "--host", "127.0.0.1",
                    "--log-level", "warning"]
            argv.append("--continuous-batching" if name == "transformers-cb" else "--no-continuous-batching")
            model, extra = str(hf), {}
        print(f"[serve_load] {name}: {' '.join(argv)}", flush=True)
        try:
            proc = start(argv, port, work / f"{name}.log")
        except RuntimeError as e:
            print(f"[serve_load] {name} did not start: {e}", flush=True)
            rows.append({"server": name, "error": str(e)[:300]})
            continue
        try:
            for c in args.concurrency:
                reqs = requests_for(args.requests_per_level or max(8, 2 * c), seed=c)
                try:
                    r = asyncio.run(level(f"http://127.0.0.1:{port}/v1", model, reqs, c, extra))
                except Exception as e:  # a peer that fails under load is a result too
                    r = {"concurrency": c, "error": f"{type(e).__name__}: {e}"[:300]}
                rows.append({"server": name, **r})
                print(f"[serve_load] {json.dumps(rows[-1])}", flush=True)
        finally:
            stop(proc)
    meta = {"model": f"llama {args.layers} layers, hidden {args.hidden}, context {args.context}, random weights",
            "cpu_threads": os.environ.get("OMP_NUM_THREADS", "default"), "command": " ".join(sys.argv)}
    (out / "serve_load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = ["| server | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['server']} | {r.get('concurrency', '-')} | error: {r['error'][:80]} |||||||")
        else:
            table.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']} | "
                         f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} |")
    text = f"# serve_load\n\n{meta['model']}; `{meta['command']}`\n\n" + "\n".join(table) + "\n"
    (out / "serve_load.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
