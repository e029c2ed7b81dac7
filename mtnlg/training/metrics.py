"""Training metrics: a log line, a JSON line in ``<save>/metrics.jsonl`` and TensorBoard scalars.

Written by global rank 0 only. Throughput is measured over the steps since the last log line;
TFLOP/s are model FLOPs (mtnlg.model.flops) summed over all ranks, and MFU divides them by
the peak of every rank together.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (``peak_memory_mb``) from the current usage."""
    if device.type != "cpu":
        torch.get_device_module(device.type).reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: device memory on an accelerator, resident set size on CPU
    (Linux's VmHWM, which ``reset_peak_memory`` can reset; elsewhere the lifetime maximum)."""
    if device.type != "cpu":
        return torch.get_device_module(device.type).max_memory_allocated(device) / 2**20
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def current_rss_mb() -> float:
    """This process's resident set size now (Linux; elsewhere its peak)."""
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else peak_memory_mb(torch.device("cpu"))


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status in MB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def drop_records_after(path: Path, iteration: int) -> int:
    """Remove the records of iterations after ``iteration`` from a metrics.jsonl (a run stopped past its last
    checkpoint logged them; the resumed run logs them again). Rewritten atomically; returns how many went."""
    if not path.is_file():
        return 0
    from mtnlg.files import write_atomic

    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("iteration", 0) > iteration:
                continue
        except (ValueError, AttributeError):
            pass  # keep what is not ours to judge
        kept.append(line)
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))
    return len(lines) - len(kept)


class Metrics:
    def __init__(self, *, enabled: bool, save_dir: str | None, total_iters: int, tokens_per_step: int,
                 flops_per_token: float, peak_tflops_total: float | None, device: torch.device,
                 tensorboard_dir: str | None = None, start_iteration: int = 0):
        self.enabled = enabled
        self.total_iters, self.tokens_per_step = total_iters, tokens_per_step
        self.flops_per_token, self.peak = flops_per_token, peak_tflops_total
        self.device = device
        self.path = Path(save_dir) / "metrics.jsonl" if (enabled and save_dir) else None
        if self.path is not None:
            drop_records_after(self.path, start_iteration)
        self.tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from mtnlg.errors import UserError

                raise UserError("logging.tensorboard is set but the tensorboard package is missing; "
                                "pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        self._start_time = time.perf_counter()
        self._start_iter = start_iteration
        self._window: list[tuple[float, float]] = []  # (loss, seconds) since the last log line
        self._window_time = 0.0

    def step(self, iteration: int, loss: float, seconds: float, *, lr: float, grad_norm: float | None,
             loss_scale: float | None, skipped: int, consumed_samples: int, log: bool,
             val_loss: float | None = None, extra: dict[str, float] | None = None,
             distill: tuple[float, float] | None = None,
             terms: dict[str, float] | None = None) -> dict[str, Any] | None:
        """Record one finished step; write a record when ``log`` (or on a validation step)."""
        self._window.append((loss, seconds))
        if not (log or val_loss is not None or extra):
            return None
        n = len(self._window)
        window_s = sum(s for _, s in self._window)
        losses = [v for v, _ in self._window if math.isfinite(v)]
        tokens_per_s = self.tokens_per_step * n / max(window_s, 1e-9)
        tflops = tokens_per_s * self.flops_per_token / 1e12
        done = iteration - self._start_iter
        eta = (time.perf_counter() - self._start_time) / max(done, 1) * (self.total_iters - iteration)
        record: dict[str, Any] = {
            "iteration": iteration,
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "skipped": skipped,
            "consumed_samples": consumed_samples,
            "step_time_s": window_s / n,
            "tokens_per_s": tokens_per_s,
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "peak_mem_mb": peak_memory_mb(self.device),
            "eta_s": eta,
        }
        if val_loss is not None:
            record["val_loss"] = val_loss
            record["val_ppl"] = math.exp(min(val_loss, 50.0))
        if distill is not None:  # this step's terms (the loss above averages the window)
            record["distill_kl"], record["distill_lm"] = distill
        if terms:  # a loss's own terms, this step's (BERT: lm_loss, sop_loss)
            record.update(terms)
            self._terms = tuple(terms)
        if extra:
            record.update({f"eval/{k}": v for k, v in extra.items()})
        self._window = []
        if self.enabled:
            self._write(record)
        return record

    def _write(self, r: dict[str, Any]) -> None:
        parts = [
            f"iter {r['iteration']:>6d}/{self.total_iters}",
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.3e}",
            f"grad_norm {r['grad_norm']:.3f}" if r["grad_norm"] is not None else "grad_norm -",
        ]
        if r["loss_scale"] is not None:
            parts.append(f"scale {r['loss_scale']:.0f} skipped {r['skipped']}")
        parts += [f"{r['tokens_per_s']:.0f} tok/s", f"{r['tflops']:.3f} TFLOP/s"]
        if r["mfu"] is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        parts += [f"mem {r['peak_mem_mb']:.0f}MB", f"ETA {_fmt_time(r['eta_s'])}"]
        parts += [f"{k} {r[k]:.4f}" for k in getattr(self, "_terms", ()) if k in r]
        if "distill_kl" in r:
            parts.append(f"kl {r['distill_kl']:.4f} lm {r['distill_lm']:.4f}")
        if "val_loss" in r:
            parts.append(f"val_loss {r['val_loss']:.4f} ppl {r['val_ppl']:.2f}")
        parts += [f"{k} {v:.4g}" for k, v in r.items() if k.startswith("eval/")]
        print(" | ".join(parts), flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(r) + "\n")
        if self.tb is not None:
            for key, value in r.items():
                if key != "iteration" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, r["iteration"])
            self.tb.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

