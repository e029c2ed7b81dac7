"""The outputs of ``mtnlg bench``: ``bench.json`` (every figure and every step time), ``bench.md``
(the tables docs/performance.md shows) and ``bench.png`` (the same as bars, drawn with matplotlib when installed)."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtnlg.files import write_atomic


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal ("-" for None)."""
    return "-" if x is None else f"{100 * x:.1f}%"


def _mem(values: list | None) -> str:
    vals = [v for v in (values or []) if v is not None]
    return "-" if not vals else " / ".join(f"{v / 1024:.2f}" for v in vals)


def _model_line(r: dict) -> str:
    m = r["config"]["model"]
    arch = m.get("architecture") or m.get("preset")  # results of earlier versions name it preset
    return (f"{arch} {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
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
                    f"{pct(s['mfu_median'])} | {pct(s['mfu_best'])} | {_mem(s['peak_mem_mb'])}")

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
                    f"{s['tflops_median']:.3g} | {pct(s['mfu_median'])} | {_mem(s['peak_mem_mb'])}")

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
                         f"{pct(row['efficiency_median'])} | {pct(row['efficiency_best'])} | "
                         f"{pct(row['ideal'])} | {_mem(row['pp2']['peak_mem_mb'])} |")
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
    lines += _memory_lines(r.get("memory"))
    return "\n".join(lines)


def _memory_lines(mem: dict[str, Any] | None) -> list[str]:
    """The memory section's tables (mtnlg.bench.memory)."""
    if not mem:
        return []
    mb = 2**20
    lines = ["## Memory: activations at tp=2, recompute, predicted vs measured peaks", "",
             "Activations: bytes autograd keeps for backward over one micro batch's forward on a rank (parameters "
             "excluded), tp=2: all, and those of the transformer blocks, which `mtnlg.training.memory` predicts.", "",
             "| recompute | sequence parallel | all MB | blocks MB | blocks predicted MB |", "|---|---|---:|---:|---:|"]
    for row in mem["activations"]:
        lines.append(f"| {row['recompute']} | {'on' if row['sequence_parallel'] else 'off'} | "
                     f"{max(row['bytes']) / mb:.1f} | {max(row['blocks_bytes']) / mb:.1f} | "
                     f"{row['predicted_blocks_bytes'] / mb:.1f} |")
    lines += ["", f"SP + selective recompute keep {mem['sp_selective_over_none_blocks']:.2f}x the blocks' activations "
              f"of neither ({mem['sp_selective_over_none']:.2f}x of all activations, logits and loss included).", ""]
    rt = mem.get("recompute_time")
    if rt:
        t, o = rt["step_s_median"], rt["overhead"]
        lines += ["| recompute (tp=2, SP off) | step s median | overhead |", "|---|---:|---:|",
                  f"| none | {t['none']:.3f} | |",
                  f"| selective | {t['selective']:.3f} | {pct(o['selective'])} |",
                  f"| full | {t['full']:.3f} | {pct(o['full'])} |", ""]
        if rt.get("selective_over_full") is not None:
            lines += [f"Selective recompute costs {rt['selective_over_full']:.2f} of full recompute's overhead.", ""]
    if mem.get("peaks"):
        lines += ["Peaks: each rank's peak of live tensor bytes over a training step once the optimizer's states "
                  "exist (the profiler's record of every allocation: what an accelerator's allocator reports as its "
                  "peak), against `mtnlg model-info`'s prediction; the resident set's growth over the same steps "
                  "beside it (it also holds freed blocks malloc keeps, and misses buffers never touched).", "",
                  "| layout | ZeRO | recompute | measured MB per rank | predicted MB per rank | measured / predicted "
                  "| resident growth MB |", "|---|---:|---|---|---|---|---|"]
        for row in mem["peaks"]:
            lines.append(f"| {row['name']} | {row['zero']} | {row['recompute']} | "
                         f"{', '.join(f'{x:.0f}' for x in row['measured_mb'])} | "
                         f"{', '.join(f'{x:.0f}' for x in row['predicted_mb'])} | "
                         f"{', '.join(f'{x:.2f}' for x in row['measured_over_predicted'])} | "
                         f"{', '.join(f'{x:.0f}' for x in row['rss_peak_mb'])} |")
        lines.append("")
    return lines


@dataclass
class Section:
    """One panel of ``bench.png``: horizontal bars ``(label, value, text, color index)``, scaled to
    ``max_value`` (default: the largest bar)."""

    title: str
    bars: list[tuple[str, float, str, int]] = field(default_factory=list)
    max_value: float | None = None

    def bar(self, label: str, value: float, text: str, color: int = 0) -> None:
        self.bars.append((label, float(value), text, color))


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c8c8c")  # mtnlg, peer, pipeline, tensor, other


def chart_sections(r: dict[str, Any]) -> list[Section]:
    """What ``bench.png`` shows: tokens/s of mtnlg and each peer variant per comparison, pipeline efficiency
    against the ideal, the tensor-parallel speedup."""
    comparisons = [(f"training tokens/s (median), {prec}", e) for prec, e in (r.get("main") or {}).items()]
    if r.get("data_parallel"):
        dp = r["data_parallel"]
        comparisons.append((f"training tokens/s (median), dp={dp['dp']}, {dp['precision']}", dp))
    sections = []
    for title, e in comparisons:
        s = Section(title)
        s.bar("mtnlg", e["mtnlg"]["tokens_per_s_median"], f"{e['mtnlg']['tokens_per_s_median']:.0f} tok/s, "
              f"MFU {pct(e['mtnlg']['mfu_median'])}", color=0)
        variants, chosen = peer_variants(e), _peer_attn(e)
        for attn, v in variants.items():
            ratio = v.get("mtnlg_ratio_median", e.get("ratio_median"))
            s.bar(f"HF {attn}" + (" (peer)" if attn == chosen else ""), v["tokens_per_s_median"],
                  f"{v['tokens_per_s_median']:.0f} tok/s" + (f", mtnlg {ratio:.2f}x" if ratio else ""),
                  color=1 if attn == chosen else 4)
        sections.append(s)
    lay = r.get("layouts")
    if lay:
        s = Section("pipeline efficiency pp=2 (median) vs ideal m/(m+1)", max_value=1.0)
        for row in lay["pipeline"]:
            s.bar(f"m={row['m']}", row["efficiency_median"], pct(row["efficiency_median"]), color=2)
            s.bar(f"m={row['m']} ideal", row["ideal"], pct(row["ideal"]), color=4)
        sections.append(s)
        if lay.get("tensor"):
            tp = lay["tensor"]
            s = Section("tensor parallel speedup tp=2 vs tp=1 (ideal 2)", max_value=2.0)
            s.bar("tp=2", tp["speedup_median"], f"{tp['speedup_median']:.2f}x", color=3)
            sections.append(s)
    return sections


def draw_chart(title: str, sections: list[Section], width_px: int = 900, dpi: int = 100) -> bytes:
    """The sections as a PNG: one panel of horizontal bars each, values written beside the bars. Needs
    matplotlib; draws off-screen (Agg), never touches pyplot's global state or a display."""
    from matplotlib.figure import Figure

    rows = [max(len(s.bars), 1) for s in sections]
    fig = Figure(figsize=(width_px / dpi, 0.8 + sum(0.3 * n + 0.5 for n in rows)), dpi=dpi, layout="constrained")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    axes = fig.subplots(len(sections), 1, squeeze=False, height_ratios=[n + 1.5 for n in rows])[:, 0]
    for ax, s in zip(axes, sections):
        labels, values, texts, colors = zip(*s.bars) if s.bars else ((), (), (), ())
        y = range(len(values))
        ax.barh(y, values, color=[PALETTE[c % len(PALETTE)] for c in colors], height=0.7)
        top = s.max_value or max([*values, 1e-12])
        ax.set_xlim(0, top * 1.45)  # room for the text after the longest bar
        for i, (v, t) in enumerate(zip(values, texts)):
            ax.text(max(v, 0.0) + top * 0.01, i, t, va="center", fontsize=8)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(s.title, loc="left", fontsize=9, color="0.25")
        ax.tick_params(axis="x", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def write_report(r: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``bench.json``, ``bench.md`` and (with matplotlib installed) ``bench.png``; returns what was written."""
    out = Path(out_dir)
    r.setdefault("time", time.time())
    written = [out / "bench.json", out / "bench.md"]
    write_atomic(written[0], json.dumps(r, indent=1, default=str) + "\n")
    write_atomic(written[1], markdown(r))
    try:
        png = draw_chart(f"mtnlg bench: {_model_line(r)}", chart_sections(r))
    except ImportError:
        print("bench: bench.png skipped: matplotlib is not installed (pip install 'mtnlg[bench]')", file=sys.stderr)
        return written
    write_atomic(out / "bench.png", png)
    return [*written, out / "bench.png"]
