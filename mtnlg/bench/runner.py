"""``mtnlg bench``: throughput, model TFLOP/s and MFU of mtnlg's training step, side by side with the
Hugging Face + DeepSpeed peer, plus pipeline and tensor-parallel scaling, in one run.

Every setup lives in its own worker process group (``mtnlg.bench.worker``); this process
measures the GEMM peak, builds the setups, and drives their steps turn by turn (A B B A ...),
so slow phases of a shared machine hit both sides alike. Warm-up steps are excluded; each
figure is reported as min and median over the timed steps.

- main: mtnlg vs peer, one rank with all cores (threads as training would use them), per precision; the
  peer is timed with eager and with sdpa attention (which is faster depends on the machine), and the
  ratio is against the faster of the two by median tokens/s;
- data parallel: mtnlg vs peer at dp=2 (2 ranks, 1 thread each, the global batch doubled so each rank
  does the work of a one-rank one-thread step), where both pay DeepSpeed's gradient all-reduce (at
  dp=1 mtnlg skips it: there is nothing to reduce); the peer's attention is the one-rank winner (with
  ``--no-main``, both are timed at dp=2 and the faster kept);
- pipeline: pp=2 (2 ranks, 1 thread each) against the same model on one rank with 1 thread, at
  several micro-batch counts m: efficiency = t(pp=1) / (2 * t(pp=2)), ideal m / (m + 1);
- tensor: tp=2 (2 ranks, 1 thread each) against tp=1 on one rank with 1 thread: speedup, ideal 2.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import secrets
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import torch

from mtnlg.bench.report import pct, write_report
from mtnlg.config import ConfigError, from_dict, load_config, resolve, to_dict
from mtnlg.errors import UserError


@dataclass
class BenchOptions:
    config: str
    overrides: list[str] = field(default_factory=list)
    steps: int = 10
    warmup: int = 2
    peer: bool = False
    output: str = "bench_out"
    precisions: list[str] | None = None  # default: the config's train.precision
    main: bool = True  # the one-rank mtnlg (vs peer) comparison
    dp: bool = True  # the dp=2 mtnlg (vs peer) comparison
    memory: bool = True  # activations with/without SP and recompute, recompute's time, predicted vs measured peaks
    layouts: bool = True
    peer_attns: tuple[str, ...] = ("eager", "sdpa")  # the peer's attention variants; the faster is the peer
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    layout_micro_batch_size: int = 1
    layout_steps: int | None = None  # default: steps
    threads: int | None = None  # per process of the main comparison; default: all cores (CPU)
    peak_sizes: tuple[int, ...] = (512, 1024, 2048, 4096)
    peak_repeats: int = 10


class BenchError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


# --------------------------------------------------------------------------- workers


class Worker:
    """A worker process group (``ranks`` processes, ``threads`` threads each) and its control connection."""

    def __init__(self, name: str, ranks: int, threads: int, log_dir: Path, start_timeout_s: float = 900):
        """Start the processes; ``connect()`` waits for them (start several, then connect each)."""
        self.name, self.start_timeout_s = name, start_timeout_s
        key = secrets.token_bytes(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = self.listener.address
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(MTNLG_BENCH_ADDR=f"{host}:{port}", MTNLG_BENCH_KEY=key.hex(), OMP_NUM_THREADS=str(threads),
                   PYTHONWARNINGS="ignore")
        if ranks == 1:
            cmd = [sys.executable, "-m", "mtnlg.bench.worker"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "mtnlg.bench.worker"]
        self.log_path = log_dir / f"{name}.log"
        self._log_file = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.conn = None
        self.exiting = False

    def connect(self) -> Worker:
        accepted: list = []
        t = threading.Thread(target=lambda: accepted.append(self.listener.accept()), daemon=True)
        t.start()
        deadline = time.monotonic() + self.start_timeout_s
        while t.is_alive():
            t.join(1.0)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise BenchError(f"worker {self.name} did not start:\n{self.tail()}")
        self.conn = accepted[0]
        return self

    def tail(self, lines: int = 30) -> str:
        self._log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def send(self, cmd: dict[str, Any]) -> None:
        """Send a command; ``answer()`` waits for its reply (send to several workers, then collect: they overlap)."""
        self.conn.send(cmd)

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.send(cmd)
        return self.answer()

    def answer(self) -> dict[str, Any]:
        while not self.conn.poll(1.0):
            if self.proc.poll() is not None:
                raise BenchError(f"worker {self.name} exited (status {self.proc.returncode}):\n{self.tail()}")
        try:
            answer = self.conn.recv()
        except (EOFError, OSError):
            self.proc.wait(timeout=60)
            raise BenchError(f"worker {self.name} died (status {self.proc.returncode}; -9 is often the kernel's "
                             f"out-of-memory killer):\n{self.tail()}") from None
        if not answer.get("ok"):
            raise BenchError(f"worker {self.name} failed: {answer.get('error')}")
        return answer

    def build(self, kind: str, cfg: dict, optimizer: dict | None = None, attn: str | None = None) -> dict:
        return self.call(build_command(kind, cfg, optimizer, attn))["info"]

    def steps(self, n: int) -> dict:
        return self.call({"op": "steps", "n": n})

    def request_exit(self) -> None:
        """Ask the processes to exit (``close()`` waits for them; ask several first, and they wind down together)."""
        try:
            if self.proc.poll() is None and self.conn is not None and not self.exiting:
                self.conn.send({"op": "exit"})
                self.exiting = True
        except (OSError, EOFError):
            pass

    def close(self) -> None:
        self.request_exit()
        try:
            if self.exiting:
                self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.listener.close()
        self._log_file.close()


def build_command(kind: str, cfg: dict, optimizer: dict | None = None, attn: str | None = None) -> dict[str, Any]:
    """The worker command that builds setup ``kind`` (see ``mtnlg.bench.worker``)."""
    return {"op": "build", "kind": kind, "config": cfg, "optimizer": optimizer, "attn": attn}


def start_workers(specs: dict[str, tuple[int, int]], log_dir: Path) -> dict[str, Worker]:
    """Fresh workers ``name -> (ranks, threads)``, started together. Each setup gets its own processes, so
    its peak memory is its own and nothing of an earlier setup lingers."""
    workers = {name: Worker(name, ranks, threads, log_dir) for name, (ranks, threads) in specs.items()}
    try:
        for w in workers.values():
            w.connect()
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        w.request_exit()
    for w in workers.values():
        w.close()


def interleave(workers: dict[str, Worker], steps: int, warmup: int) -> dict[str, dict]:
    """Warm every worker up, then time ``steps`` steps of each, one step per turn, order A B, B A, ..."""
    for w in workers.values():
        if warmup:
            w.steps(warmup)
    names = list(workers)
    times: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, dict] = {}
    for i in range(steps):
        for n in (names if i % 2 == 0 else names[::-1]):
            last[n] = workers[n].steps(1)
            times[n] += last[n]["times"]
    return {n: {"times": times[n], "loss": last[n]["loss"], "mem_mb": last[n]["mem_mb"]} for n in names}


# --------------------------------------------------------------------------- figures


def throughput(times: list[float], tokens_per_step: int, flops_per_token: float, peak: float | None) -> dict:
    """tokens/s, model TFLOP/s and MFU at the best (min) and the median step time."""
    out: dict[str, Any] = {"steps": len(times), "step_s_min": min(times), "step_s_median": statistics.median(times)}
    for tag, t in (("best", min(times)), ("median", statistics.median(times))):
        tok_s = tokens_per_step / t
        tflops = tok_s * flops_per_token / 1e12
        out[f"tokens_per_s_{tag}"] = tok_s
        out[f"tflops_{tag}"] = tflops
        out[f"mfu_{tag}"] = tflops / peak if peak else None
    return out


def _device_kind() -> str:
    return torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"


def bench_config(opts: BenchOptions) -> dict:
    """The run config as a dict, made safe to bench: no checkpoints, no logs, a vocabulary size."""
    cfg = load_config(opts.config, opts.overrides)
    if cfg.model.vocab_size is None:
        from mtnlg.training.sources import data_tokenizer, with_vocab

        cfg = with_vocab(cfg, data_tokenizer(cfg))
    d = to_dict(cfg)
    d["checkpoint"] = {"save": None, "load": None, "interval": 0}
    d["logging"] = {"tensorboard": None}
    d["data"] = {"synthetic": {"seed": 0}}  # the benchmark feeds its own random tokens
    d["model"]["padded_vocab_size"] = None
    d["parallel"]["data"] = None
    d["train"]["grad_accum_steps"] = None
    return d


def config_variant(base: dict, world: int, **changes: Any) -> dict:
    """``base`` with section.key changes (e.g. parallel__pipeline=2), checked by resolving it."""
    d = copy.deepcopy(base)
    for key, value in changes.items():
        section, name = key.split("__")
        d[section][name] = value
    try:
        resolve(from_dict(d), world)
    except ConfigError as e:
        raise UserError(f"bench: {e}") from None
    return d


# --------------------------------------------------------------------------- the run


def run(opts: BenchOptions) -> dict[str, Any]:
    from mtnlg.bench.setups import PEER_ATTNS
    from mtnlg.model.flops import flops_per_token
    from mtnlg.training.peak import gemm_peaks, nominal_peak_tflops

    if opts.steps < 1 or opts.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    if opts.peer and (not opts.peer_attns or set(opts.peer_attns) - set(PEER_ATTNS)):
        raise UserError(f"--peer-attn {','.join(opts.peer_attns)}: give one or more of {', '.join(PEER_ATTNS)}")
    out_dir = Path(opts.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    base = bench_config(opts)
    base = config_variant(base, 1, parallel__tensor=1, parallel__pipeline=1)
    precisions = opts.precisions or [base["train"]["precision"]]
    device = _device_kind()
    cores = os.cpu_count() or 1
    threads = opts.threads or (cores if device == "cpu" else 1)
    cfg = resolve(from_dict(base), 1)
    fpt = flops_per_token(cfg.model)
    if opts.peer:  # the peer's class may lack an implementation (T5's: eager only)
        from mtnlg.bench.setups import hf_class, peer_attns

        has = [a for a in opts.peer_attns if a in peer_attns(cfg)]
        if not has:
            raise UserError(f"--peer-attn {','.join(opts.peer_attns)}: {hf_class(cfg).__name__} has "
                            f"{', '.join(peer_attns(cfg))} only")
        if len(has) < len(opts.peer_attns):
            _log(f"the peer ({hf_class(cfg).__name__}) has no {', '.join(set(opts.peer_attns) - set(has))} "
                 "attention; timing it with " + ", ".join(has))
        opts = dataclasses.replace(opts, peer_attns=tuple(has))
    result: dict[str, Any] = {
        "machine": {"device": device, "cpu": platform.processor() or platform.machine(), "cores": cores,
                    "torch": torch.__version__, "python": platform.python_version()},
        "config": {"path": str(opts.config), "overrides": opts.overrides, "model": base["model"],
                   "micro_batch_size": cfg.train.micro_batch_size, "global_batch_size": cfg.train.global_batch_size,
                   "deepspeed_config": base.get("deepspeed_config")},
        "flops_per_token": fpt, "steps": opts.steps, "warmup": opts.warmup, "threads": threads,
        "peer_attns": list(opts.peer_attns) if opts.peer else [],
    }
    try:
        import deepspeed
        import transformers

        result["machine"].update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError:
        pass

    # --- peak
    if device == "cpu":
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        _log(f"GEMM peak with {threads} threads (sizes {list(opts.peak_sizes)}, {opts.peak_repeats} repeats)")
        peaks = gemm_peaks(sizes=opts.peak_sizes, repeats=opts.peak_repeats)
        torch.set_num_threads(1)
        # one thread: the sizes up to 2048 from 1024 (a 4096 GEMM on one thread takes long), else the smallest
        sizes_1 = tuple(n for n in opts.peak_sizes if 1024 <= n <= 2048) or (min(opts.peak_sizes),)
        peaks_1 = gemm_peaks(sizes=sizes_1, repeats=max(3, opts.peak_repeats // 2))
        torch.set_num_threads(saved)
        peak_of = {"bf16": peaks["bf16"]["best"], "fp32": peaks["fp32"]["best"], "fp16": None}
        peak_1 = {"bf16": peaks_1["bf16"]["best"], "fp32": peaks_1["fp32"]["best"], "fp16": None}
        result["gemm_peak"] = {"threads": threads, **peaks}
        result["gemm_peak_1thread"] = peaks_1
        for name, p in peaks.items():
            _log(f"  {name}: best {p['best']:.3f} TFLOP/s, median {p['median']:.3f}")
    else:
        nominal = nominal_peak_tflops(torch.device(device, 0))
        peak_of = peak_1 = {"bf16": nominal, "fp16": nominal, "fp32": nominal}
        result["gemm_peak"] = {"nominal_bf16": nominal}

    # --- main: mtnlg vs peer
    precisions_main = precisions if opts.main else []
    result["main"] = {}
    for prec in precisions_main:
        cfg_p = config_variant(base, 1, train__precision=prec)
        attns = list(opts.peer_attns) if opts.peer else []
        result["main"][prec] = _mtnlg_vs_peer(opts, cfg_p, attns, 1, threads, peak_of.get(prec), fpt, logs, prec)

    if device == "cpu" and precisions_main:  # the peak again, after the runs: MFU uses the best seen
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        again = gemm_peaks(sizes=opts.peak_sizes, repeats=opts.peak_repeats)
        torch.set_num_threads(saved)
        for name, p in again.items():
            if p["best"] > peaks[name]["best"]:
                _log(f"  {name} GEMM peak measured again: best {p['best']:.3f} TFLOP/s (was {peaks[name]['best']:.3f})")
                peaks[name] = p
        result["gemm_peak"] = {"threads": threads, **peaks}
        for prec, entry in result["main"].items():
            for s in (entry["mtnlg"], *entry.get("peer_variants", {}).values()):  # "peer" is one of the variants
                s["mfu_best"] = s["tflops_best"] / peaks[prec]["best"] if prec in peaks else None
                s["mfu_median"] = s["tflops_median"] / peaks[prec]["best"] if prec in peaks else None

    ranks_available = cores if device == "cpu" else torch.accelerator.device_count()
    # --- data parallel
    if opts.dp and ranks_available >= 2:
        result["data_parallel"] = _data_parallel(opts, base, precisions[0], result["main"], peak_1, fpt, logs)
    elif opts.dp:
        _log("dp=2 skipped: it needs 2 cores (CPU) or 2 devices")
    # --- memory
    if opts.memory and ranks_available >= 2:
        from mtnlg.bench.memory import memory_section

        result["memory"] = memory_section(config_variant(base, 1, train__precision=precisions[0]),
                                          opts.layout_steps or opts.steps, opts.warmup, logs)
    elif opts.memory:
        _log("memory skipped: it needs 2 cores (CPU) or 2 devices")
    # --- layouts
    if opts.layouts and ranks_available >= 2:
        result["layouts"] = _layouts(opts, base, precisions[0], peak_1, fpt, logs)
    elif opts.layouts:
        _log("layouts skipped: they need 2 cores (CPU) or 2 devices")
    _log(f"wrote {', '.join(map(str, write_report(result, out_dir)))}")
    return result


def _mtnlg_vs_peer(opts: BenchOptions, cfg: dict, attns: list[str], ranks: int, threads: int, peak: float | None,
                   fpt: float, logs: Path, tag: str, suffix: str = "") -> dict[str, Any]:
    """mtnlg and an HF peer per attention in ``attns`` (none: mtnlg alone), built from ``cfg`` in workers of
    ``ranks`` x ``threads``, timed interleaved. The entry holds each one's figures; "peer" is the variant
    with the higher median tokens/s (the peer at its best), and the ratios are mtnlg's against it."""
    names = {"mtnlg": f"mtnlg{suffix}", **{a: f"peer-{a}{suffix}" for a in attns}}
    workers = start_workers({n: (ranks, threads) for n in names.values()}, logs)
    try:
        _log(f"[{tag}] building mtnlg" + (f" and the HF peer ({' and '.join(attns)} attention)" if attns else ""))
        infos = {"mtnlg": workers[names["mtnlg"]].build("mtnlg", cfg)}
        for a in attns:  # the peer variants build at the same time
            workers[names[a]].send(build_command("peer", cfg, infos["mtnlg"]["optimizer"], a))
        for a in attns:
            infos[a] = workers[names[a]].answer()["info"]
        _log(f"[{tag}] timing {opts.steps} steps each after {opts.warmup} warm-up steps, interleaved")
        timed = interleave(workers, opts.steps, opts.warmup)
    finally:
        close_workers(workers)

    def figures(key: str, label: str) -> dict[str, Any]:
        t, info = timed[names[key]], infos[key]
        s = {**throughput(t["times"], info["tokens_per_step"], fpt, peak),
             "times": t["times"], "loss": t["loss"], "peak_mem_mb": t["mem_mb"], "info": info}
        _log(f"[{tag}] {label}: {s['tokens_per_s_median']:.0f} tok/s median ({s['tokens_per_s_best']:.0f} best), "
             f"MFU {pct(s['mfu_median'])}")
        return s

    entry: dict[str, Any] = {"mtnlg": figures("mtnlg", "mtnlg")}
    if not attns:
        return entry
    variants = {a: figures(a, f"peer ({a})") for a in attns}
    for v in variants.values():  # mtnlg against each variant, for the report
        v["mtnlg_ratio_median"] = entry["mtnlg"]["tokens_per_s_median"] / v["tokens_per_s_median"]
        v["mtnlg_ratio_best"] = entry["mtnlg"]["tokens_per_s_best"] / v["tokens_per_s_best"]
    best = max(attns, key=lambda a: variants[a]["tokens_per_s_median"])
    entry.update(peer=variants[best], peer_attn=best, peer_variants=variants,
                 ratio_median=variants[best]["mtnlg_ratio_median"], ratio_best=variants[best]["mtnlg_ratio_best"])
    _log(f"[{tag}] the peer is the faster attention, {best}: mtnlg / peer = {entry['ratio_median']:.2f}x (median), "
         f"{entry['ratio_best']:.2f}x (best)")
    return entry


def _data_parallel(opts: BenchOptions, base: dict, prec: str, main: dict, peak_1: dict, fpt: float,
                   logs: Path) -> dict:
    """mtnlg vs the peer at dp=2, 1 thread per rank: the same micro batch size and micro batches per rank as
    the one-rank config (global batch doubled), so each rank does a one-thread dp=1 step's work plus the
    gradient all-reduce that DeepSpeed really runs at dp > 1, on both sides. The peer's attention is the
    one that won the one-rank comparison at ``prec`` (one 2-rank peer less: time and memory); without that
    comparison (``--no-main``) every variant is timed here and the faster kept."""
    one = resolve(from_dict(config_variant(base, 1, train__precision=prec)), 1).train
    cfg = config_variant(base, 2, train__precision=prec, train__global_batch_size=2 * one.global_batch_size)
    won = (main.get(prec) or {}).get("peer_attn")
    attns = ([won] if won else list(opts.peer_attns)) if opts.peer else []
    _log(f"[dp=2] mtnlg{' and the HF peer' if opts.peer else ''} on 2 ranks, 1 thread per rank, {prec}"
         + (f"; the peer's attention: {won}, the faster on one rank" if won else ""))
    peak = peak_1.get(prec)
    entry = _mtnlg_vs_peer(opts, cfg, attns, 2, 1, 2 * peak if peak else None, fpt, logs, "dp=2", suffix="-dp2")
    entry.update(dp=2, precision=prec, threads_per_rank=1, micro_batch_size=one.micro_batch_size,
                 grad_accum_steps=one.grad_accum_steps, global_batch_size=2 * one.global_batch_size,
                 peer_attn_source="main" if won else "timed")  # main: the one-rank winner; timed: here
    return entry


def _layouts(opts: BenchOptions, base: dict, prec: str, peak_1: dict, fpt: float, logs: Path) -> dict:
    steps = opts.layout_steps or opts.steps
    mbs = opts.layout_micro_batch_size
    peak = peak_1.get(prec)
    out: dict[str, Any] = {"precision": prec, "micro_batch_size": mbs, "threads_per_rank": 1, "pipeline": [],
                           "tensor": None}

    def timed(name: str, ref_cfg: dict, pair_cfg: dict) -> tuple[dict, dict]:
        workers = start_workers({"ref": (1, 1), "pair": (2, 1)}, logs)
        try:
            workers["ref"].build("mtnlg", ref_cfg)
            info = workers["pair"].build("mtnlg", pair_cfg)
            return interleave(workers, steps, opts.warmup), info
        finally:
            close_workers(workers)

    for m in opts.micro_batches:
        common = dict(train__precision=prec, train__micro_batch_size=mbs, train__global_batch_size=m * mbs)
        _log(f"[pipeline m={m}] pp=1 (1 rank) and pp=2 (2 ranks), 1 thread per rank")
        t, info = timed(f"m{m}", config_variant(base, 1, **common),
                        config_variant(base, 2, parallel__pipeline=2, **common))
        tokens = info["tokens_per_step"]
        row = {"m": m, "ideal": m / (m + 1)}
        for tag, f in (("median", statistics.median), ("best", min)):
            row[f"efficiency_{tag}"] = f(t["ref"]["times"]) / (2 * f(t["pair"]["times"]))
        row["pp1"] = {**throughput(t["ref"]["times"], tokens, fpt, peak), "peak_mem_mb": t["ref"]["mem_mb"],
                      "times": t["ref"]["times"]}
        row["pp2"] = {**throughput(t["pair"]["times"], tokens, fpt, 2 * peak if peak else None),
                      "peak_mem_mb": t["pair"]["mem_mb"], "times": t["pair"]["times"]}
        out["pipeline"].append(row)
        _log(f"[pipeline m={m}] efficiency {pct(row['efficiency_median'])} median "
             f"({pct(row['efficiency_best'])} best), ideal {pct(row['ideal'])}")
    _log("[tensor] tp=1 (1 rank) vs tp=2 (2 ranks), 1 thread per rank")
    common = dict(train__precision=prec)
    t, info = timed("tp", config_variant(base, 1, **common), config_variant(base, 2, parallel__tensor=2, **common))
    tokens = info["tokens_per_step"]
    row = {"ideal_speedup": 2.0}
    for tag, f in (("median", statistics.median), ("best", min)):
        row[f"speedup_{tag}"] = f(t["ref"]["times"]) / f(t["pair"]["times"])
    row["tp1"] = {**throughput(t["ref"]["times"], tokens, fpt, peak), "peak_mem_mb": t["ref"]["mem_mb"],
                  "times": t["ref"]["times"]}
    row["tp2"] = {**throughput(t["pair"]["times"], tokens, fpt, 2 * peak if peak else None),
                  "peak_mem_mb": t["pair"]["mem_mb"], "times": t["pair"]["times"]}
    out["tensor"] = row
    _log(f"[tensor] speedup {row['speedup_median']:.2f}x median ({row['speedup_best']:.2f}x best), ideal 2")
    return out
