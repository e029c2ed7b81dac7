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


def start(argv: list[str], port: int, log: Path, timeout: float = 300.0, env: dict | None = None) -> subprocess.Popen:
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
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


def server_command(name: str, args, ckpt: Path, hf: Path, port: int) -> tuple[list[str], str, dict, dict | None]:
    """(argv, model name, extra request fields, extra environment) of one server kind."""
    if name.startswith("mtnlg"):
        argv = [sys.executable, "-m", "mtnlg", "serve", "--checkpoint", str(ckpt), "--port", str(port),
                "--max-batch-size", str(max(args.concurrency)), "--model-name", "m"]
        env = {"PYTHONPATH": str(ROOT)}
        if name == "mtnlg-base":
            env = {"PYTHONPATH": str(Path(args.baseline_src).resolve())}
        if name == "mtnlg-tp2":  # tensor parallel over 2 ranks (torchrun); rank 0 serves HTTP
            argv = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    *argv[1:], "--device", "cpu"]
        return argv, "m", {"ignore_eos": True}, env
    argv = [str(BIN / "transformers"), "serve", str(hf), "--port", str(port), "--host", "127.0.0.1",
            "--log-level", "warning"]
    argv.append("--continuous-batching" if name == "transformers-cb" else "--no-continuous-batching")
    return argv, str(hf), {}, None


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
    """One load level against one server: raw figures (``summarize`` turns rounds of them into a row)."""
    import openai

    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=1800) as client:
        async def gated(prompt, max_tokens):
            async with gate:
                return await one(client, model, prompt, max_tokens, extra)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(gated(p, m) for p, m in reqs))
        wall = time.perf_counter() - t0
    return {"requests": len(reqs), "seconds": wall, "tokens": sum(r["tokens"] for r in results),
            "ttft": [r["ttft"] for r in results], "itl": [x for r in results for x in r["itl"]]}


def summarize(server: str, concurrency: int, runs: list[dict]) -> dict:
    """Rounds of one (server, concurrency) pooled: tokens over seconds, latency percentiles over all samples."""
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    ttft = sorted(x for r in runs for x in r["ttft"])
    itl = sorted(x for r in runs for x in r["itl"])
    return {"server": server, "concurrency": concurrency, "requests": sum(r["requests"] for r in runs),
            "output_tokens": tokens, "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
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
                    choices=["mtnlg", "mtnlg-tp2", "mtnlg-base", "transformers", "transformers-cb"])
    ap.add_argument("--tag", default="serve_load", help="results file name: TAG.json, TAG.md, TAG.png")
    ap.add_argument("--rounds", type=int, default=1, help="times each level runs on each server, interleaved")
    ap.add_argument("--baseline-src", default=None,
                    help="a source tree of mtnlg (e.g. `git archive` of an older commit) served as `mtnlg-base`, "
                         "to compare a change with what came before in the same run")
    args = ap.parse_args()
    if "mtnlg-base" in args.servers and not args.baseline_src:
        ap.error("--servers mtnlg-base needs --baseline-src DIR")
    work, out = Path(args.workdir), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, hf = build_model(work, args.layers, args.hidden, args.context)
    procs: dict[str, tuple] = {}
    rows = []
    try:
        for name in args.servers:  # all servers up at once, so each level runs on them back to back
            port = free_port()
            argv, model, extra, env = server_command(name, args, ckpt, hf, port)
            print(f"[serve_load] {name}: {' '.join(argv)}", flush=True)
            try:
                procs[name] = (start(argv, port, work / f"{name}.log", env=env), port, model, extra)
            except RuntimeError as e:
                print(f"[serve_load] {name} did not start: {e}", flush=True)
                rows.append({"server": name, "error": str(e)[:300]})
        for c in args.concurrency:
            reqs = requests_for(args.requests_per_level or max(8, 2 * c), seed=c)
            runs: dict[str, list] = {name: [] for name in procs}
            failed: dict[str, str] = {}
            for _ in range(args.rounds):  # rounds interleave the servers: load drifting on a shared machine
                for name, (_, port, model, extra) in procs.items():  # hits all of them alike
                    if name in failed:
                        continue
                    try:
                        runs[name].append(asyncio.run(level(f"http://127.0.0.1:{port}/v1", model, reqs, c, extra)))
                    except Exception as e:  # a peer that fails under load is a result too
                        failed[name] = f"{type(e).__name__}: {e}"[:300]
            for name in procs:
                row = ({"server": name, "concurrency": c, "error": failed[name]} if name in failed
                       else summarize(name, c, runs[name]))
                rows.append(row)
                print(f"[serve_load] {json.dumps(row)}", flush=True)
    finally:
        for proc, *_ in procs.values():
            stop(proc)
    meta = {"model": f"llama {args.layers} layers, hidden {args.hidden}, context {args.context}, random weights",
            "cpu_threads": os.environ.get("OMP_NUM_THREADS", "default"), "rounds": args.rounds,
            "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])}
    (out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = f"# {args.tag}\n\n{meta['model']}; `{meta['command']}`\n\n" + table(rows) + "\n"
    ratios = ratio_lines(rows)
    if ratios:
        text += "\n" + "\n".join(ratios) + "\n"
    (out / f"{args.tag}.md").write_text(text)
    plot(rows, meta, out / f"{args.tag}.png")
    print(text)
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| server | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['server']} | {r.get('concurrency', '-')} | error: {r['error'][:80]} |||||||")
        else:
            lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']} | "
                         f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} |")
    return "\n".join(lines)


def ratio_lines(rows: list[dict]) -> list[str]:
    """Per concurrency: each mtnlg server's output tokens/s over the best other server's."""
    ok = [r for r in rows if "error" not in r]
    out = []
    for c in sorted({r["concurrency"] for r in ok}):
        here = {r["server"]: r for r in ok if r["concurrency"] == c}
        peers = {k: v for k, v in here.items() if not k.startswith("mtnlg")}
        if not peers:
            continue
        best = max(peers, key=lambda k: peers[k]["tokens_per_s"])
        for name in (k for k in here if k.startswith("mtnlg")):
            m, p = here[name], peers[best]
            out.append(f"- concurrency {c}: {name} / {best} output tokens/s = "
                       f"{m['tokens_per_s'] / p['tokens_per_s']:.2f}x; TTFT p99 {m['ttft_p99_ms']} vs "
                       f"{p['ttft_p99_ms']} ms, ITL p99 {m['itl_p99_ms']} vs {p['itl_p99_ms']} ms")
    return out


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Output tokens/s, TTFT p99 and ITL p99 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (key, title), ax in zip([("tokens_per_s", "output tokens/s"), ("ttft_p99_ms", "TTFT p99 (ms)"),
                                 ("itl_p99_ms", "inter-token latency p99 (ms)")], axes):
        for name in dict.fromkeys(r["server"] for r in ok):
            pts = sorted((r["concurrency"], r[key]) for r in ok if r["server"] == name)
            ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        levels = sorted({r["concurrency"] for r in ok})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key != "tokens_per_s":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"{meta['model']}; CPU threads per process: {meta['cpu_threads']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
