"""The outputs of ``mtnlg bench``: ``bench.json`` (every figure and every step time), ``bench.md``
(the tables the README shows) and ``bench.png`` (the same as bars)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mtnlg.bench.png import BarChart


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mem(values: list | None) -> str:
    vals = [v for v in (values or []) if v is not None]
    return "-" if not vals else " / ".join(f"{v / 1024:.2f}" for v in vals)


def _model_line(r: dict) -> str:
    m = r["config"]["model"]
    return (f"{m['preset']} {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
            f"seq {m['seq_length']}, vocab {m['vocab_size']}")


def markdown(r: dict[str, Any]) -> str:
    mach, cfg = r["machine"], r["config"]
    lines = [
        f"# mtnlg bench: {_model_line(r)}",
        "",
        f"{time.strftime('%Y-%m-%d', time.gmtime(r.get('time', time.time())))}; {mach['device']} "
        f"({mach['cpu']}, {mach['cores']} cores); torch {mach['torch']}, deepspeed {mach.get('deepspeed', '?')}, "
        f"transformers {mach.get('transformers', '?')}. Micro batch {cfg['micro_batch_size']}, global batch "
        f"{cfg['global_batch_size']} sequences, DeepSpeed config `{cfg['deepspeed_config']}`; "
        f"{r['steps']} timed steps per setup after {r['warmup']} warm-up steps, setups interleaved step by step; "
        "best = fastest step, median = median step.",
        "",
    ]
    peak = r.get("gemm_peak", {})
    if "fp32" in peak:
        lines += [f"GEMM peak ({peak['threads']} threads, single square GEMMs): "
                  + "; ".join(f"{k} best {peak[k]['best']:.3f} TFLOP/s, median {peak[k]['median']:.3f}"
                              for k in ("fp32", "bf16") if k in peak) + ". MFU is against the best.", ""]
    elif peak.get("nominal_bf16"):
        lines += [f"Peak: nominal {peak['nominal_bf16']:.0f} TFLOP/s (bf16 dense) per device.", ""]

    main = r.get("main") or {}
    if main:
        lines += ["## Training step: mtnlg vs Hugging Face + DeepSpeed (one rank, "
                  f"{r['threads']} threads)", "",
                  "| precision | setup | tokens/s median | tokens/s best | model TFLOP/s median | MFU median "
                  "| MFU best | peak mem GB | mtnlg / peer (median, best) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for prec, e in main.items():
            for name in ("mtnlg", "peer"):
                if name not in e:
                    continue
                s = e[name]
                label = "mtnlg" if name == "mtnlg" else f"HF {s['info'].get('model_class', '')} (sdpa)"
                ratio = f"{e['ratio_median']:.2f}x, {e['ratio_best']:.2f}x" if name == "mtnlg" and "ratio_median" in e \
                    else ""
                lines.append(f"| {prec} | {label} | {s['tokens_per_s_median']:.0f} | {s['tokens_per_s_best']:.0f} | "
                             f"{s['tflops_median']:.3g} | {_pct(s['mfu_median'])} | {_pct(s['mfu_best'])} | "
                             f"{_mem(s['peak_mem_mb'])} | {ratio} |")
        lines.append("")

    lay = r.get("layouts")
    if lay:
        lines += [f"## Pipeline parallelism: pp=2 (2 ranks) vs pp=1 (1 rank), 1 thread per rank, micro batch "
                  f"{lay['micro_batch_size']}, {lay['precision']}", "",
                  "efficiency = t(pp=1) / (2 t(pp=2)); ideal m / (m + p - 1) with p = 2.", "",
                  "| micro batches m | pp=1 step s | pp=2 step s | efficiency median | efficiency best | ideal "
                  "| peak mem GB pp=2 (per rank) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in lay["pipeline"]:
            lines.append(f"| {row['m']} | {row['pp1']['step_s_median']:.2f} | {row['pp2']['step_s_median']:.2f} | "
                         f"{_pct(row['efficiency_median'])} | {_pct(row['efficiency_best'])} | "
                         f"{_pct(row['ideal'])} | {_mem(row['pp2']['peak_mem_mb'])} |")
        tp = lay.get("tensor")
        if tp:
            lines += ["", "## Tensor parallelism: tp=2 (2 ranks) vs tp=1 (1 rank), 1 thread per rank", "",
                      "| | step s median | tokens/s median | peak mem GB (per rank) |", "|---|---:|---:|---:|",
                      f"| tp=1 | {tp['tp1']['step_s_median']:.2f} | {tp['tp1']['tokens_per_s_median']:.0f} | "
                      f"{_mem(tp['tp1']['peak_mem_mb'])} |",
                      f"| tp=2 | {tp['tp2']['step_s_median']:.2f} | {tp['tp2']['tokens_per_s_median']:.0f} | "
                      f"{_mem(tp['tp2']['peak_mem_mb'])} |", "",
                      f"Speedup {tp['speedup_median']:.2f}x median ({tp['speedup_best']:.2f}x best); ideal 2.00x."]
        lines.append("")
    return "\n".join(lines)


def chart(r: dict[str, Any]) -> BarChart:
    c = BarChart(f"mtnlg bench: {_model_line(r)}")
    for prec, e in (r.get("main") or {}).items():
        c.section(f"training tokens/s (median), {prec}")
        c.bar("mtnlg", e["mtnlg"]["tokens_per_s_median"], f"{e['mtnlg']['tokens_per_s_median']:.0f} tok/s, "
              f"MFU {_pct(e['mtnlg']['mfu_median'])}", color=0)
        if "peer" in e:
            c.bar("HF peer", e["peer"]["tokens_per_s_median"], f"{e['peer']['tokens_per_s_median']:.0f} tok/s, "
                  f"mtnlg {e['ratio_median']:.2f}x", color=1)
    lay = r.get("layouts")
    if lay:
        c.section("pipeline efficiency pp=2 (median) vs ideal m/(m+1)", max_value=1.0)
        for row in lay["pipeline"]:
            c.bar(f"m={row['m']}", row["efficiency_median"], _pct(row["efficiency_median"]), color=2)
            c.bar(f"m={row['m']} ideal", row["ideal"], _pct(row["ideal"]), color=4)
        if lay.get("tensor"):
            tp = lay["tensor"]
            c.section("tensor parallel speedup tp=2 vs tp=1 (ideal 2)", max_value=2.0)
            c.bar("tp=2", tp["speedup_median"], f"{tp['speedup_median']:.2f}x", color=3)
    return c


def write_report(r: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    r.setdefault("time", time.time())
    (out / "bench.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    (out / "bench.md").write_text(markdown(r))
    chart(r).save(out / "bench.png")
