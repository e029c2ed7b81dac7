"""``mtnlg bench``: figures from step times, the report files, and one tiny end-to-end run (mtnlg vs the
HF peer, interleaved in two worker processes). Timings are printed, never asserted."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mtnlg.bench.runner import throughput

TINY = """
model: {preset: gpt2, num_layers: 2, hidden_size: 64, num_attention_heads: 4, vocab_size: 500, seq_length: 32}
train: {micro_batch_size: 2, global_batch_size: 4, precision: bf16}
deepspeed_config: %s
"""
ROOT = Path(__file__).resolve().parent.parent


def test_throughput_figures():
    t = throughput([2.0, 1.0, 4.0], tokens_per_step=1000, flops_per_token=1e9, peak=2.0)
    assert t["step_s_min"] == 1.0 and t["step_s_median"] == 2.0
    assert t["tokens_per_s_best"] == 1000 and t["tokens_per_s_median"] == 500
    assert t["tflops_best"] == pytest.approx(1.0) and t["mfu_best"] == pytest.approx(0.5)
    assert throughput([1.0], 10, 1.0, None)["mfu_median"] is None


def _result() -> dict:
    info = {"model_class": "GPT2LMHeadModel"}
    step = {**throughput([1.0, 1.2], 2048, 8e8, 0.8), "peak_mem_mb": [3000.0], "info": info}
    peer = {**throughput([2.0, 2.5], 2048, 8e8, 0.8), "peak_mem_mb": [3500.0], "info": info}
    row = {"m": 8, "ideal": 8 / 9, "efficiency_median": 0.8, "efficiency_best": 0.82,
           "pp1": {**throughput([8.0], 4096, 8e8, 0.4), "peak_mem_mb": [2000.0]},
           "pp2": {**throughput([5.0], 4096, 8e8, 0.8), "peak_mem_mb": [1200.0, 1400.0]}}
    return {
        "machine": {"device": "cpu", "cpu": "x86_64", "cores": 2, "torch": "2", "deepspeed": "0", "transformers": "5"},
        "config": {"model": {"preset": "gpt2", "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                             "seq_length": 512, "vocab_size": 50257},
                   "micro_batch_size": 2, "global_batch_size": 4, "deepspeed_config": "ds_configs/zero1.json"},
        "steps": 2, "warmup": 1, "threads": 2,
        "gemm_peak": {"threads": 2, "fp32": {"best": 0.2, "median": 0.19}, "bf16": {"best": 0.8, "median": 0.7}},
        "main": {"bf16": {"mtnlg": step, "peer": peer, "ratio_median": 2.0, "ratio_best": 2.0}},
        "layouts": {"precision": "bf16", "micro_batch_size": 1, "pipeline": [row],
                    "tensor": {"speedup_median": 1.6, "speedup_best": 1.7, "ideal_speedup": 2.0,
                               "tp1": {**throughput([4.0], 2048, 8e8, 0.4), "peak_mem_mb": [2000.0]},
                               "tp2": {**throughput([2.5], 2048, 8e8, 0.8), "peak_mem_mb": [1100.0, 1100.0]}}},
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_files(tmp_path):
    from mtnlg.bench.report import write_report

    write_report(_result(), tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "| bf16 | mtnlg | 1862 | 2048 |" in md  # median of 1.0 s and 1.2 s steps of 2048 tokens
    assert "2.00x, 2.00x" in md and "| 8 | 8.00 | 5.00 | 80.0% | 82.0% | 88.9% |" in md
    assert "Speedup 1.60x median" in md
    assert json.loads((tmp_path / "bench.json").read_text())["main"]["bf16"]["ratio_median"] == 2.0
    w, h = _png_size(tmp_path / "bench.png")
    assert w >= 760 and h > 100


def test_png_text_and_bars(tmp_path):
    from mtnlg.bench.png import BarChart

    c = BarChart("T", width=200)
    c.section("s")
    c.bar("a", 1.0, "1", color=0)
    c.bar("b", 0.5, "0.5", color=1)
    canvas = c.render()
    blue = bytes((31, 119, 180))
    rows = [bytes(canvas.px[3 * y * canvas.w: 3 * (y + 1) * canvas.w]) for y in range(canvas.h)]
    widths = [r.count(blue) for r in rows if r.count(blue)]
    assert widths and max(widths) > 20  # the full-length bar
    assert _png_size(c.save(tmp_path / "c.png")) == (canvas.w, canvas.h)


def test_bench_end_to_end_tiny(tmp_path, capsys):
    """mtnlg and the HF peer, both through deepspeed.initialize, interleaved; figures are finite."""
    from mtnlg.bench.runner import BenchOptions, run

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY % (ROOT / "ds_configs" / "zero1.json"))
    r = run(BenchOptions(config=str(cfg), steps=2, warmup=1, peer=True, output=str(tmp_path / "out"),
                         layouts=False, peak_sizes=(256,), peak_repeats=2))
    e = r["main"]["bf16"]
    for name in ("mtnlg", "peer"):
        assert len(e[name]["times"]) == 2 and e[name]["tokens_per_s_median"] > 0
        assert 5.0 < e[name]["loss"] < 8.0  # ~ln(500) at init: both train the same task
        assert e[name]["peak_mem_mb"][0] > 50
    for flag in ("fused", "foreach"):  # the peer's AdamW runs the same implementation as mtnlg's
        assert e["mtnlg"]["info"]["optimizer"][flag] == e["peer"]["info"]["optimizer"][flag]
    assert e["peer"]["info"]["attn_implementation"] == "sdpa"
    assert (tmp_path / "out" / "bench.md").read_text().count("| bf16 |") == 2
    print(capsys.readouterr().out)
