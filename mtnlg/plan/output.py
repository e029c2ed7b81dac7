"""What ``mtnlg plan`` prints and writes: the ranked table, the rejected families, JSON rows, and a run config +
DeepSpeed JSON for one layout."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from mtnlg.config import RunConfig, to_dict
from mtnlg.files import write_atomic
from mtnlg.plan.hardware import Hardware
from mtnlg.plan.planner import Plan, Scored
from mtnlg.training.ds_config import load_ds_json
from mtnlg.training.memory import GB

COLUMNS = ("rank", "tp", "pp", "dp", "mb", "zero", "sp", "recompute", "mem GiB", "step s", "tokens/s",
           "TFLOP/s/GPU", "MFU")


def table(rows: list[Scored]) -> str:
    lines = [COLUMNS]
    for i, s in enumerate(rows, 1):
        lay = s.layout
        lines.append((str(i), str(lay.tensor), str(lay.pipeline), str(lay.data), str(lay.micro_batch_size),
                      str(lay.zero_stage), "on" if lay.sequence_parallel else "off", lay.recompute,
                      f"{s.memory_bytes / GB:.1f}", f"{s.step_time_s:.3g}", f"{s.tokens_per_s:,.0f}",
                      f"{s.tflops_per_gpu:.4g}", f"{100 * s.mfu:.1f}%"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines)


def breakdown(s: Scored) -> str:
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in s.time.breakdown().items() if v > 0)
    return f"step time of #1 ({s.step_time_s:.3g} s): {parts}"


def rejected_lines(plan: Plan, limit: int = 6) -> list[str]:
    out = []
    for reason, families in plan.rejected.items():
        shown = "; ".join(families[:limit]) + (f"; ... ({len(families) - limit} more)" if len(families) > limit else "")
        out.append(f"  {shown}: {reason}")
    return out


def report(plan: Plan, hw: Hardware, world: int, top: int) -> str:
    """The text ``mtnlg plan`` prints."""
    best = plan.best_per_family()
    head = (f"{world} x {hw.name} ({hw.memory_gib:g} GiB, {hw.usable_bytes / GB:.1f} usable; peak "
            f"{hw.peak_bf16_tflops:g} TFLOP/s 16-bit, {hw.peak_fp32_tflops:g} fp32): {len(best)} (tp, pp, dp) layouts "
            f"fit, best of each (micro batch, ZeRO, SP, recompute) shown; {plan.evaluated} layouts scored")
    lines = [head]
    if best:
        lines += [table(best[:top]), breakdown(best[0])]
    lines.append("TFLOP/s/GPU counts the FLOPs executed, recompute included (Narayanan et al. 2021); MFU counts the "
                 "model's only, against the peak")
    if plan.rejected:
        lines.append("rejected:")
        lines += rejected_lines(plan)
    return "\n".join(lines)


def write_run(base: RunConfig, s: Scored, global_batch: int, out_dir: str | Path) -> tuple[Path, Path]:
    """``out_dir/run.yaml`` (``base`` with the layout's settings) and ``out_dir/ds_config.json`` (the run's DeepSpeed
    JSON with the layout's ZeRO stage), each written atomically; ``mtnlg train --config out_dir/run.yaml`` runs it
    (the YAML names the JSON by a path relative to the directory ``mtnlg plan`` ran in, as run configs do)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lay = s.layout
    ds = copy.deepcopy(load_ds_json(base.deepspeed_config))
    ds.setdefault("zero_optimization", {})["stage"] = lay.zero_stage
    d = to_dict(base)
    d["model"].update(recompute=lay.recompute, activation_checkpointing=None, padded_vocab_size=None)
    d["parallel"] = {"tensor": lay.tensor, "pipeline": lay.pipeline, "data": None,
                     "sequence_parallel": lay.sequence_parallel}
    d["train"].update(micro_batch_size=lay.micro_batch_size, global_batch_size=global_batch, grad_accum_steps=None)
    ds_path, yaml_path = out / "ds_config.json", out / "run.yaml"
    d["deepspeed_config"] = str(ds_path)
    note = (f"# written by mtnlg plan: {lay.label()} on {s.world} GPUs; predicted {s.memory_bytes / GB:.1f} GiB per "
            f"GPU, {s.step_time_s:.3g} s per step, {s.tflops_per_gpu:.1f} TFLOP/s per GPU\n")
    write_atomic(ds_path, json.dumps(ds, indent=2) + "\n")
    write_atomic(yaml_path, note + yaml.safe_dump(d, sort_keys=False))
    return yaml_path, ds_path
