"""The outputs of ``mtnlg bench``: ``bench.json`` (every figure and every step time), ``bench.md``
(the tables the README shows) and ``bench.png`` (the same as bars)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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


def peer_variants(e: dict) -> dict[str, dict]:
    """attention implementation -> figures of each HF peer variant of a comparison entry (results written before
    the bench timed both attentions have one "peer")."""
    if e.get("peer_variants"):
        return e["peer_variants"]
    return {e["peer"]["info"].get("attn_implementation", "sdpa"): e["peer"]} if "peer" in e else {}


def _peer_attn(e: dict) -> str | None:
    """The attention of the variant the ratio is against (the faster by median tokens/s)."""
    return e.get("peer_attn") or next(iter(peer_variants(e)), None)


def _comparison_rows(e: dict, cells: Callable[[dict], str]) -> list[str]:
    """mtnlg's row (ratio against the peer) and each HF variant's row (ratio of mtnlg against it); ``cells(s)``
    gives a setup's figure columns."""
    rows = []
    ratio = f"{e['ratio_median']:.2f}x, {e['ratio_best']:.2f}x" if "ratio_median" in e else ""
    rows.append(f"mtnlg | {cells(e['mtnlg'])} | {ratio} |")
    variants, chosen = peer_variants(e), _peer_attn(e)
    for attn, v in variants.items():
        mark = ", the peer" if attn == chosen and len(variants) > 1 else ""
        label = f"HF {v['info'].get('model_class', '')} ({attn}){mark}"
        if "mtnlg_ratio_median" in v:
            ratio = f"{v['mtnlg_ratio_median']:.2f}x, {v['mtnlg_ratio_best']:.2f}x"
        else:  # an older result: its one variant is the peer
            ratio = f"{e['ratio_median']:.2f}x, {e['ratio_best']:.2f}x" if "ratio_median" in e else ""
        rows.append(f"{label} | {cells(v)} | {ratio} |")
    return rows


def _peer_note(entries: dict[str, dict]) -> list[str]:
    """Which attention the peer used, per entry (e.g. per precision)."""
    picks = [(tag, _peer_attn(e), peer_variants(e)) for tag, e in entries.items() if "peer" in e]
    if not picks:
        return []
    if all(len(v) == 1 for _, _, v in picks):
        return [f"The peer used HF's {' / '.join(sorted({a for _, a, _ in picks}))} attention; "
                "mtnlg / HF = mtnlg's tokens/s over that row's.", ""]
    which = "; ".join(f"{tag}: {a}" for tag, a, _ in picks)
    timed = " and with ".join(dict.fromkeys(a for _, _, v in picks for a in v))
    return [f"The HF model was timed with {timed} attention; the peer (the ratio on mtnlg's row) is the "
            f"faster by median tokens/s ({which}). On each HF row, mtnlg / HF = mtnlg's tokens/s over that row's.",
            ""]


def _dp_attn_note(dp: dict) -> str:
    """How the dp row's peer got its attention."""
    attn = _peer_attn(dp)
    if attn is None:
        return ""
    if dp.get("peer_attn_source") == "main":
        return (f"The peer's attention, {attn}, is the one that won the one-rank {dp['precision']} comparison "
                "above (one 2-rank peer less to run). ")
    if len(peer_variants(dp)) > 1:
        return f"The HF model was timed with each attention here; the peer is the faster, {attn}. "
    return f"The peer's attention: {attn}. "


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
                  "| MFU best | peak mem GB | mtnlg / HF (median, best) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

        def cells(s: dict) -> str:
            return (f"{s['tokens_per_s_median']:.0f} | {s['tokens_per_s_best']:.0f} | {s['tflops_median']:.3g} | "
                    f"{_pct(s['mfu_median'])} | {_pct(s['mfu_best'])} | {_mem(s['peak_mem_mb'])}")

        for prec, e in main.items():
            lines += [f"| {prec} | {row}" for row in _comparison_rows(e, cells)]
        lines += ["", *_peer_note(main)]

    dp = r.get("data_parallel")
    if dp:
        info = dp["mtnlg"]["info"]
        stage = info.get("zero_stage")
        lines += [f"## Data parallelism: mtnlg vs Hugging Face + DeepSpeed at dp={dp['dp']} ({dp['dp']} ranks, "
                  f"{dp['threads_per_rank']} thread each), {dp['precision']}", "",
                  f"Each rank runs {dp['grad_accum_steps']} micro batches of {dp['micro_batch_size']} sequences per "
                  f"step, the work of a one-rank one-thread step (global batch {dp['global_batch_size']}); "
                  f"{'DeepSpeed ZeRO stage ' + str(stage) if stage is not None else 'DeepSpeed'} on both sides, "
                  f"and both all-reduce the gradients across the {dp['dp']} ranks every step (at dp=1 mtnlg skips "
                  f"DeepSpeed's gradient reduction: a group of one has nothing to reduce). {_dp_attn_note(dp)}"
                  "MFU against the one-thread GEMM peak times the ranks.", "",
                  "| setup | step s median | tokens/s median | tokens/s best | model TFLOP/s median | MFU median "
                  "| peak mem GB (per rank) | mtnlg / HF (median, best) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]

        def dp_cells(s: dict) -> str:
            return (f"{s['step_s_median']:.2f} | {s['tokens_per_s_median']:.0f} | {s['tokens_per_s_best']:.0f} | "
                    f"{s['tflops_median']:.3g} | {_pct(s['mfu_median'])} | {_mem(s['peak_mem_mb'])}")

        lines += [f"| {row}" for row in _comparison_rows(dp, dp_cells)]
        lines.append("")
        if "ratio_median" in dp:
            lines += [f"mtnlg / peer ({_peer_attn(dp)}) at dp={dp['dp']}: {dp['ratio_median']:.2f}x median "
                      f"({dp['ratio_best']:.2f}x best).", ""]

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
    sections = [(f"training tokens/s (median), {prec}", e) for prec, e in (r.get("main") or {}).items()]
    if r.get("data_parallel"):
        dp = r["data_parallel"]
        sections.append((f"training tokens/s (median), dp={dp['dp']}, {dp['precision']}", dp))
    for title, e in sections:
        c.section(title)
        c.bar("mtnlg", e["mtnlg"]["tokens_per_s_median"], f"{e['mtnlg']['tokens_per_s_median']:.0f} tok/s, "
              f"MFU {_pct(e['mtnlg']['mfu_median'])}", color=0)
        variants, chosen = peer_variants(e), _peer_attn(e)
        for attn, v in variants.items():
            ratio = v.get("mtnlg_ratio_median", e.get("ratio_median"))
            c.bar(f"HF {attn}" + (" (peer)" if attn == chosen else ""), v["tokens_per_s_median"],
                  f"{v['tokens_per_s_median']:.0f} tok/s" + (f", mtnlg {ratio:.2f}x" if ratio else ""),
                  color=1 if attn == chosen else 4)
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
