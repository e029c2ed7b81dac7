"""``mtnlg bench``: figures from step times, the report files, and one tiny end-to-end run (mtnlg vs the
HF peer with eager and with sdpa attention, interleaved in worker processes, then the same at dp=2).
Timings are printed, never asserted."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mtnlg.bench.runner import throughput

TINY = """
model: {architecture: gpt2, num_layers: 2, hidden_size: 64, num_attention_heads: 4, vocab_size: 500, seq_length: 32}
train: {micro_batch_size: 2, global_batch_size: 4, precision: bf16}
deepspeed_config: %s
"""
SMALL = """
model: {architecture: gpt2, num_layers: 2, hidden_size: 256, num_attention_heads: 4, vocab_size: 8192, seq_length: 256}
train: {micro_batch_size: 2, global_batch_size: 2, precision: bf16}
deepspeed_config: %s
"""
ROOT = Path(__file__).resolve().parent.parent


def test_throughput_figures():
    t = throughput([2.0, 1.0, 4.0], tokens_per_step=1000, flops_per_token=1e9, peak=2.0)
    assert t["step_s_min"] == 1.0 and t["step_s_median"] == 2.0
    assert t["tokens_per_s_best"] == 1000 and t["tokens_per_s_median"] == 500
    assert t["tflops_best"] == pytest.approx(1.0) and t["mfu_best"] == pytest.approx(0.5)
    assert throughput([1.0], 10, 1.0, None)["mfu_median"] is None


def _peer(times: list[float], attn: str, mtnlg: dict, tokens: int = 2048, ranks: int = 1) -> dict:
    info = {"model_class": "GPT2LMHeadModel", "attn_implementation": attn, "zero_stage": 1}
    v = {**throughput(times, tokens, 8e8, 0.8), "peak_mem_mb": [3500.0] * ranks, "info": info}
    v["mtnlg_ratio_median"] = mtnlg["tokens_per_s_median"] / v["tokens_per_s_median"]
    v["mtnlg_ratio_best"] = mtnlg["tokens_per_s_best"] / v["tokens_per_s_best"]
    return v


def _result() -> dict:
    step = {**throughput([1.0, 1.2], 2048, 8e8, 0.8), "peak_mem_mb": [3000.0], "info": {"zero_stage": 1}}
    variants = {"eager": _peer([2.0, 2.5], "eager", step), "sdpa": _peer([2.4, 2.6], "sdpa", step)}
    dp_step = {**throughput([1.0, 1.0], 4096, 8e8, 0.8), "peak_mem_mb": [3000.0, 3100.0], "info": {"zero_stage": 1}}
    dp_peer = _peer([1.6, 1.5], "eager", dp_step, tokens=4096, ranks=2)
    row = {"m": 8, "ideal": 8 / 9, "efficiency_median": 0.8, "efficiency_best": 0.82,
           "pp1": {**throughput([8.0], 4096, 8e8, 0.4), "peak_mem_mb": [2000.0]},
           "pp2": {**throughput([5.0], 4096, 8e8, 0.8), "peak_mem_mb": [1200.0, 1400.0]}}
    return {
        "machine": {"device": "cpu", "cpu": "x86_64", "cores": 2, "torch": "2", "deepspeed": "0", "transformers": "5"},
        "config": {"model": {"architecture": "gpt2", "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                             "seq_length": 512, "vocab_size": 50257},
                   "micro_batch_size": 2, "global_batch_size": 4, "deepspeed_config": "ds_configs/zero1.json"},
        "steps": 2, "warmup": 1, "threads": 2,
        "gemm_peak": {"threads": 2, "fp32": {"best": 0.2, "median": 0.19}, "bf16": {"best": 0.8, "median": 0.7}},
        "main": {"bf16": {"mtnlg": step, "peer": variants["eager"], "peer_attn": "eager", "peer_variants": variants,
                          "ratio_median": 2.0, "ratio_best": 2.0}},
        "data_parallel": {"mtnlg": dp_step, "peer": dp_peer, "peer_attn": "eager", "peer_variants": {"eager": dp_peer},
                          "ratio_median": 1.6, "ratio_best": 1.5, "dp": 2, "precision": "bf16", "threads_per_rank": 1,
                          "micro_batch_size": 2, "grad_accum_steps": 2, "global_batch_size": 8,
                          "peer_attn_source": "main"},
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
    assert "| 8 | 8.00 | 5.00 | 80.0% | 82.0% | 88.9% |" in md and "Speedup 1.60x median" in md
    # both peer variants, the faster (eager) marked as the peer; mtnlg / each variant on its row
    assert "| bf16 | mtnlg | 1862 | 2048 | 1.49 | 186.2% | 204.8% | 2.93 | 2.00x, 2.00x |" in md
    assert "| bf16 | HF GPT2LMHeadModel (eager), the peer | 910 | 1024 |" in md and "| 2.05x, 2.00x |" in md
    assert "| bf16 | HF GPT2LMHeadModel (sdpa) | 819 | 853 |" in md and "| 2.27x, 2.40x |" in md
    assert "the faster by median tokens/s (bf16: eager)" in md
    # the dp=2 row: tokens/s of both (4096 tokens per step), per-rank memory, the ratio, where the attention came from
    assert "## Data parallelism: mtnlg vs Hugging Face + DeepSpeed at dp=2 (2 ranks, 1 thread each), bf16" in md
    assert "| mtnlg | 1.00 | 4096 | 4096 |" in md and "| 2.93 / 3.03 | 1.60x, 1.50x |" in md
    assert "| HF GPT2LMHeadModel (eager) | 1.55 | 2643 | 2731 |" in md and "ZeRO stage 1 on both sides" in md
    assert "won the one-rank bf16 comparison" in md and "mtnlg / peer (eager) at dp=2: 1.60x median" in md
    r = json.loads((tmp_path / "bench.json").read_text())
    e = r["main"]["bf16"]
    assert e["ratio_median"] == 2.0 and e["peer"]["info"]["attn_implementation"] == "eager"
    assert set(e["peer_variants"]) == {"eager", "sdpa"} and r["data_parallel"]["dp"] == 2
    w, h = _png_size(tmp_path / "bench.png")
    assert w == 900 and h > 300  # four panels


def test_report_of_an_older_result(tmp_path):
    """A bench.json from before the peer had variants (one "peer", sdpa) still renders."""
    from mtnlg.bench.report import write_report

    r = _result()
    del r["data_parallel"]
    e = r["main"]["bf16"]
    del e["peer_variants"], e["peer_attn"], e["peer"]["mtnlg_ratio_median"], e["peer"]["mtnlg_ratio_best"]
    e["peer"]["info"] = {"model_class": "GPT2LMHeadModel"}
    write_report(r, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "| bf16 | HF GPT2LMHeadModel (sdpa) | 910 | 1024 |" in md and md.count("2.00x, 2.00x") == 2
    assert "The peer used HF's sdpa attention" in md and "Data parallelism" not in md


def test_bench_options_on_the_command_line():
    import argparse

    from mtnlg.bench.commands import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["bench", "--config", "x.yaml"])
    assert args.dp and args.layouts and args.peer_attn == ("eager", "sdpa")
    args = parser.parse_args(["bench", "--config", "x.yaml", "--no-dp", "--peer-attn", "sdpa"])
    assert not args.dp and args.peer_attn == ("sdpa",)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--config", "x.yaml", "--peer-attn", "flash"])


def test_chart_bars_are_to_scale(tmp_path):
    """bench.png's bars: a bar of half the value is half as long (read back from the PNG's pixels)."""
    import io

    from matplotlib.image import imread

    from mtnlg.bench.report import PALETTE, Section, chart_sections, draw_chart

    s = Section("s")
    s.bar("a", 1.0, "1", color=0)
    s.bar("b", 0.5, "0.5", color=1)
    png = draw_chart("T", [s], width_px=600)
    img = (imread(io.BytesIO(png))[..., :3] * 255).round().astype(int)
    assert img.shape[1] == 600

    def longest_run(color: str) -> int:
        rgb = [int(color[i: i + 2], 16) for i in (1, 3, 5)]
        return int((abs(img - rgb).sum(axis=2) <= 6).sum(axis=1).max())

    a, b = longest_run(PALETTE[0]), longest_run(PALETTE[1])
    assert a > 150 and b / a == pytest.approx(0.5, abs=0.02)
    # the report's panels: one per comparison, pipeline efficiency against the ideal, the tp speedup
    titles = [x.title for x in chart_sections(_result())]
    assert titles == ["training tokens/s (median), bf16", "training tokens/s (median), dp=2, bf16",
                      "pipeline efficiency pp=2 (median) vs ideal m/(m+1)",
                      "tensor parallel speedup tp=2 vs tp=1 (ideal 2)"]
    assert [b[0] for b in chart_sections(_result())[0].bars] == ["mtnlg", "HF eager (peer)", "HF sdpa"]


def test_bench_end_to_end_tiny(tmp_path, capsys):
    """mtnlg and the HF peer (eager and sdpa), all through deepspeed.initialize, interleaved; then mtnlg and the
    faster peer at dp=2 (2 ranks each). Figures are finite and consistent; timings are not asserted."""
    from mtnlg.bench.runner import BenchOptions, run

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY % (ROOT / "ds_configs" / "zero1.json"))
    r = run(BenchOptions(config=str(cfg), steps=2, warmup=1, peer=True, output=str(tmp_path / "out"),
                         layouts=False, memory=False, threads=1, peak_sizes=(256,), peak_repeats=2))
    e = r["main"]["bf16"]
    assert set(e["peer_variants"]) == {"eager", "sdpa"}
    for name, s in (("mtnlg", e["mtnlg"]), *e["peer_variants"].items()):
        assert len(s["times"]) == 2 and s["tokens_per_s_median"] > 0, name
        assert 5.0 < s["loss"] < 8.0  # ~ln(500) at init: all train the same task
        assert s["peak_mem_mb"][0] > 50
        if name != "mtnlg":
            assert s["info"]["attn_implementation"] == name
            for flag in ("fused", "foreach"):  # the peer's AdamW runs the same implementation as mtnlg's
                assert s["info"]["optimizer"][flag] == e["mtnlg"]["info"]["optimizer"][flag]
    # the peer is the faster variant by median tokens/s, and the ratios are against it
    fastest = max(e["peer_variants"], key=lambda a: e["peer_variants"][a]["tokens_per_s_median"])
    assert e["peer_attn"] == fastest and e["peer"]["info"]["attn_implementation"] == fastest
    assert e["ratio_median"] == pytest.approx(e["mtnlg"]["tokens_per_s_median"] / e["peer"]["tokens_per_s_median"])
    assert e["ratio_best"] == pytest.approx(e["mtnlg"]["tokens_per_s_best"] / e["peer"]["tokens_per_s_best"])

    dp = r["data_parallel"]  # 2 ranks of 1 thread, each doing the one-rank step's work
    assert dp["dp"] == 2 and dp["peer_attn"] == fastest and dp["peer_attn_source"] == "main"
    assert dp["global_batch_size"] == 2 * r["config"]["global_batch_size"]
    for name, s in (("mtnlg", dp["mtnlg"]), ("peer", dp["peer"])):
        assert s["info"]["layout"]["data"] == 2 and s["info"]["zero_stage"] == 1, name
        assert s["info"]["tokens_per_step"] == 2 * e[name]["info"]["tokens_per_step"]
        assert len(s["times"]) == 2 and s["tokens_per_s_median"] > 0 and 5.0 < s["loss"] < 8.0
        assert len(s["peak_mem_mb"]) == 2 and min(s["peak_mem_mb"]) > 50
    assert dp["ratio_median"] == pytest.approx(dp["mtnlg"]["tokens_per_s_median"] / dp["peer"]["tokens_per_s_median"])

    md = (tmp_path / "out" / "bench.md").read_text()
    assert md.count("| bf16 |") == 3 and f"({fastest}), the peer" in md
    assert "## Data parallelism" in md and f"mtnlg / peer ({fastest}) at dp=2" in md
    print(capsys.readouterr().out)


def test_memory_section_measures_what_the_model_predicts(tmp_path):
    """The bench's memory section on a small model: one peak row per kind of stage (tp=2 with SP and selective
    recompute; pp=2, whose first stage keeps two micro batches in flight) measured by the profiler's record of
    live tensors against ``mtnlg.training.memory``, within 15%; the report renders what it measured."""
    from mtnlg.bench.memory import peaks
    from mtnlg.bench.report import _memory_lines
    from mtnlg.bench.runner import BenchOptions, bench_config

    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL % (ROOT / "ds_configs" / "zero1.json"))
    base = bench_config(BenchOptions(config=str(cfg)))
    rows = peaks(base, 1, tmp_path, rows=[("tp2 sp selective", 2, 1, 1, 1, "selective", True),
                                          ("pp2", 1, 2, 1, 1, "none", False)])
    for row in rows:
        assert len(row["measured_mb"]) == len(row["predicted_mb"]) == 2
        for ratio in row["measured_over_predicted"]:
            assert 0.85 <= ratio <= 1.15, row
        assert min(row["measured_mb"]) > min(row["step_start_mb"])  # a step allocates on top of the states
    md = "\n".join(_memory_lines({"activations": [], "peaks": rows, "sp_selective_over_none": 0.5,
                                  "sp_selective_over_none_blocks": 0.4}))
    assert "| pp2 | 1 | none |" in md


BERT_MEM = """
model: {architecture: megatron_bert, num_layers: 4, hidden_size: 128, num_attention_heads: 4, vocab_size: 4096,
        seq_length: 128}
train: {micro_batch_size: 2, global_batch_size: 2, precision: bf16}
deepspeed_config: %s
"""
T5_MEM = """
model: {architecture: t5, num_layers: 4, encoder_layers: 2, hidden_size: 128, num_attention_heads: 4,
        ffn_hidden_size: 256, vocab_size: 4096, seq_length: 128, decoder_seq_length: 64}
train: {micro_batch_size: 2, global_batch_size: 2, precision: bf16}
deepspeed_config: %s
"""


def test_memory_model_of_bert_and_t5_at_tp2_pp2(tmp_path):
    """The memory model of the BERT and T5 families against the measured peak of live tensors over a training step at
    tp 2 x pp 2 (4 micro batches: the first stage keeps two in flight), within 15% on every rank; both models in one
    4-rank launch. The T5's stages differ: stage 0 holds the encoder and the first decoder block (and the embedding
    both stacks use), stage 1 the last decoder block and the output layer of its own (no embedding copy)."""
    from mtnlg.bench.memory import peaks
    from mtnlg.bench.runner import BenchOptions, bench_config

    bases = {}
    for name, text in (("bert", BERT_MEM), ("t5", T5_MEM)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text % (ROOT / "ds_configs" / "zero1.json"))
        bases[name] = bench_config(BenchOptions(config=str(path)))
    rows = peaks(bases["bert"], 1, tmp_path, rows=[("tp2 pp2", 2, 2, 1, 1, "none", False)],
                 others={"t5": bases["t5"]})
    assert [r["architecture"] for r in rows] == ["megatron_bert", "t5"]
    for row in rows:
        print(f"\n{row['architecture']} tp2 pp2: measured {[round(x, 2) for x in row['measured_mb']]} MB, predicted "
              f"{[round(x, 2) for x in row['predicted_mb']]} MB per rank")
        assert len(row["measured_mb"]) == 4 and row["layout"]["tensor"] == row["layout"]["pipeline"] == 2
        for ratio in row["measured_over_predicted"]:
            assert 0.85 <= ratio <= 1.15, row
    t5 = rows[1]["predicted_mb"]
    assert t5[0] > t5[2] + 2  # the stages differ: the model sees which blocks and tied copies each holds


def test_the_gemm_peak_measurement_is_bounded_in_time():
    """Rank 0 measures the GEMM peak while the other ranks wait in their first collective: a size whose GEMMs
    would take the measurement past its budget is skipped (a 8192^3 GEMM after a 256^3 one, 1 s budget), so a CPU
    that runs a dtype slowly (bf16 without matrix units: minutes per large GEMM under load) cannot stall a run
    past its collective timeout."""
    import torch

    from mtnlg.training.peak import measure_gemm

    got = measure_gemm(torch.float32, sizes=(256, 8192), repeats=2, budget_s=1.0)
    assert "best_256" in got and "best_8192" not in got and got["best"] == got["best_256"] > 0


BERT_TINY = """
model: {architecture: megatron_bert, num_layers: 2, hidden_size: 64, num_attention_heads: 4, vocab_size: 500,
        seq_length: 32}
train: {micro_batch_size: 2, global_batch_size: 4, precision: bf16}
deepspeed_config: %s
"""
T5_TINY = """
model: {architecture: t5, num_layers: 4, encoder_layers: 2, hidden_size: 64, num_attention_heads: 4,
        ffn_hidden_size: 128, vocab_size: 500, seq_length: 32, decoder_seq_length: 16}
train: {micro_batch_size: 2, global_batch_size: 4, precision: bf16}
deepspeed_config: %s
"""


@pytest.mark.slow
@pytest.mark.parametrize("text, hf_class, attns", [(BERT_TINY, "MegatronBertForPreTraining", {"eager"}),
                                                   (T5_TINY, "T5ForConditionalGeneration", {"eager", "sdpa"})],
                         ids=["bert", "t5"])
def test_bench_rows_of_bert_and_t5(tmp_path, text, hf_class, attns):
    """The BERT and T5 rows: mtnlg against the HF class the family exports to (MegatronBertForPreTraining,
    T5ForConditionalGeneration) with every attention implementation that class has, through deepspeed.initialize
    on the same batches (the family's synthetic samples: masked sentence pairs; the copy task), interleaved."""
    from mtnlg.bench.runner import BenchOptions, run

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(text % (ROOT / "ds_configs" / "zero1.json"))
    r = run(BenchOptions(config=str(cfg), steps=1, warmup=1, peer=True, output=str(tmp_path / "out"), dp=False,
                         layouts=False, memory=False, threads=1, peak_sizes=(256,), peak_repeats=2))
    e = r["main"]["bf16"]
    assert set(e["peer_variants"]) == attns and r["peer_attns"] == sorted(attns, key=["eager", "sdpa"].index)
    for name, s in (("mtnlg", e["mtnlg"]), *e["peer_variants"].items()):
        assert len(s["times"]) == 1 and s["tokens_per_s_median"] > 0 and s["loss"] > 0, name
        if name != "mtnlg":
            assert s["info"]["model_class"] == hf_class and s["info"]["params"] > 0
    if hf_class.startswith("MegatronBert"):  # same heads, same batches: both near ln(vocab) + ln(2) at init
        losses = [e["mtnlg"]["loss"], e["peer"]["loss"]]
        assert all(abs(x - 6.9) < 0.5 for x in losses), losses
    assert f"HF {hf_class} (" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize("text", [BERT_TINY, T5_TINY], ids=["bert", "t5"])
def test_the_peer_trains_on_the_same_loss(tmp_path, text):
    """The BERT and T5 peers compute mtnlg's loss: the HF model the bench builds, imported into mtnlg
    (``import-hf``), gives the same loss on the bench's batch (the family's synthetic samples, through the
    adapter's ``training_kwargs``: MLM at the predicted positions + sentence order; the decoder's targets)."""
    import torch

    from mtnlg.bench.runner import BenchOptions, bench_config
    from mtnlg.bench.setups import bench_batches, hf_model, training_kwargs
    from mtnlg.checkpoint import load_native_model
    from mtnlg.cli import main as cli_main
    from mtnlg.config import from_dict, resolve

    path = tmp_path / "tiny.yaml"
    path.write_text(text % (ROOT / "ds_configs" / "zero1.json"))
    cfg = resolve(from_dict(bench_config(BenchOptions(config=str(path)))), 1)
    torch.manual_seed(0)
    hf = hf_model(cfg, "eager").eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    assert cli_main(["import-hf", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"),
                     "--set", f"model.seq_length={cfg.model.seq_length}"]) == 0
    native, _, _ = load_native_model(tmp_path / "ckpt")
    inputs, labels = bench_batches(cfg, 0, 1, torch.device("cpu"))[0]
    with torch.no_grad():
        want = float(hf(**training_kwargs(cfg)(inputs, labels)).loss)
        got = float(native.eval()(inputs, labels))
    print(f"\n{cfg.model.architecture}: HF peer loss {want:.6f}, mtnlg {got:.6f}")
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
