"""mtnlg plan: the planner's arithmetic (FLOP accounting, collectives, placement, bubble, memory from the memory
model), its rankings and TFLOP/s against published runs, the example configs and the command line. Pure
arithmetic: nothing here times anything."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import yaml

from mtnlg.cli import main
from mtnlg.config import from_dict, load_config, resolve
from mtnlg.parallel.state import ParallelDims
from mtnlg.plan.cost import ring_time, spans_nodes
from mtnlg.plan.hardware import hardware
from mtnlg.plan.planner import Choices, Cluster, Layout, check_layout, plan
from mtnlg.training.memory import predict_memory

EX = "examples/plan"
A100 = hardware("A100-80GB")

# Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"),
# Table 1, and Smith et al. 2022 (MT-NLG 530B, 280 DGX A100 nodes, 60.1 s per step): config, nodes of 8 A100s,
# global batch, published (tp, pp), published TFLOP/s per GPU.
PUBLISHED = [
    ("narayanan2021/n1_7b", 4, 512, (1, 1), 137),
    ("narayanan2021/n18_4b", 32, 1024, (8, 1), 135),
    ("narayanan2021/n145_6b", 192, 2304, (8, 8), 148),
    ("narayanan2021/n529_6b", 315, 2520, (8, 35), 163),
    ("narayanan2021/n1008b", 384, 3072, (8, 64), 163),
    ("mtnlg_530b", 280, 1920, (8, 35), 126),
]


def published_plan(name: str, nodes: int, batch: int):
    """The runs' own settings: full recompute, no sequence parallelism; Megatron-LM 2021 had no optimizer sharding
    (ZeRO-0 memory, fp16), MT-NLG ran DeepSpeed (mtnlg's own search)."""
    megatron = name.startswith("narayanan")
    choices = Choices(recompute=("full",), sequence_parallel=(False,), zero_stage=(0,) if megatron else None,
                      runnable_only=not megatron)
    return plan(load_config(f"{EX}/{name}.yaml"), A100, Cluster(nodes, 8), batch, choices)


def _rank_cases():
    for case in PUBLISHED:
        marks = []
        if case[0].endswith("n18_4b"):
            why = ("the model ranks the published tp=8 pp=1 7th (tp=2 pp=4 and 5 others up to 13% faster): tp=8's "
                   "all-reduces and replicated elementwise work cost more than a pipeline bubble at 32 micro batches; "
                   "the same preference puts tp4 x pp16 0.4% above tp8 x pp8 in Figure 13 at batch 512 "
                   "(test_tensor_8_pipeline_8_is_best_for_162b_on_64_gpus)")
            marks = [pytest.mark.xfail(strict=True, reason=why)]
        yield pytest.param(*case, marks=marks, id=case[0].split("/")[-1])


@pytest.mark.parametrize("name,nodes,batch,layout,tflops", list(_rank_cases()))
def test_published_layout_is_feasible_and_in_the_top_3(name, nodes, batch, layout, tflops):
    p = published_plan(name, nodes, batch)
    rank = p.rank_of(*layout)
    assert rank is not None, f"{layout} does not fit: {p.rejected}"
    assert rank <= 3, [s.layout.label() for s in p.best_per_family()[:rank]]


@pytest.mark.parametrize("name,nodes,batch,layout,tflops", PUBLISHED, ids=[c[0].split("/")[-1] for c in PUBLISHED])
def test_published_tflops_within_15_percent(name, nodes, batch, layout, tflops):
    p = published_plan(name, nodes, batch)
    rank = p.rank_of(*layout)
    predicted = p.best_per_family()[rank - 1].tflops_per_gpu
    assert abs(predicted / tflops - 1) <= 0.15, (predicted, tflops)


def test_tflops_count_the_papers_formula():
    """Executed FLOPs with full recompute are Narayanan et al.'s 96 B s l h^2 (1 + s/6h + V/16lh); model FLOPs
    (MFU) their 72 B s l h^2 (1 + s/6h + V/12lh); the per-GPU figure divides by time and GPUs."""
    base = load_config(f"{EX}/narayanan2021/n145_6b.yaml")
    s_ = check_layout(base, A100, Cluster(192, 8), 2304, Layout(8, 8, 24, 1, 1, False, "full"))
    m = resolve(from_dict({"model": dataclasses.asdict(base.model)}), 1).model
    B, s, L, h, V = 2304, m.seq_length, m.num_layers, m.hidden_size, m.padded_vocab_size
    assert s_.time.hardware_flops == pytest.approx(96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h)),
                                                   rel=1e-3)  # biases and norms add nothing; V is padded for tp 1
    assert s_.time.model_flops == pytest.approx(72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h)), rel=1e-3)
    assert s_.tflops_per_gpu == pytest.approx(s_.time.hardware_flops / s_.step_time_s / 1536 / 1e12)
    assert s_.mfu == pytest.approx(s_.time.model_flops / s_.step_time_s / 1536 / 312e12)


def test_ring_collectives():
    n, bw, lat = 8e6, 1e9, 1e-5
    assert ring_time("all_reduce", n, 8, bw, lat) == pytest.approx(2 * 7 / 8 * n / bw + 14 * lat)
    assert ring_time("all_gather", n, 8, bw, lat, slowdown=2.0) == pytest.approx(7 / 8 * n * 2 / bw + 7 * lat)
    assert ring_time("reduce_scatter", n, 1, bw, lat) == 0.0
    assert ring_time("p2p", n, 1, bw, lat) == pytest.approx(n / bw + lat)


def test_node_spanning_follows_deepspeeds_rank_order():
    for tp, pp, dp, g in itertools.product([1, 2, 4], [1, 2, 3], [1, 2, 3, 4], [2, 4, 8]):
        if tp > g:
            continue
        dims = ParallelDims(tp=tp, pp=pp, dp=dp)
        for axis in ("tp", "dp"):
            want = any(len({r // g for r in grp}) > 1 for grp in dims.groups(axis))
            assert spans_nodes(tp, pp, dp, g, axis) == want, (tp, pp, dp, g, axis)
        want = any(dims.rank_of(t, i, d) // g != dims.rank_of(t, i + 1, d) // g
                   for t in range(tp) for d in range(dp) for i in range(pp - 1))
        assert spans_nodes(tp, pp, dp, g, "pp") == want, (tp, pp, dp, g)


def _tiny(**model):
    return from_dict({"model": {"architecture": "gpt2", "num_layers": 24, "hidden_size": 1024,
                                "num_attention_heads": 16, "seq_length": 1024, "vocab_size": 128, **model},
                      "train": {"precision": "bf16"}, "deepspeed_config": "ds_configs/zero1.json"})


def test_bubble_is_pp_minus_1_over_m_for_equal_stages():
    """24 equal blocks on 4 stages (a 128-token vocabulary: the head is ~nothing): fill and drain cost (pp - 1)
    stage-micro-batches, i.e. the bubble over the pipelined time is (pp - 1) / m."""
    base = _tiny()
    for m_ in (4, 8, 32):
        s = check_layout(base, A100, Cluster(1, 4), m_, Layout(1, 4, 1, 1, 1, False, "none"))
        t = s.time
        steady = t.compute + t.recompute + t.memory_bound + t.tp_comm + t.p2p
        assert t.bubble / steady == pytest.approx(3 / m_, rel=0.02)


def test_recompute_costs_a_forward_and_saves_memory():
    base = _tiny()
    cl = Cluster(1, 1)
    none, sel, full = (check_layout(base, A100, cl, 8, Layout(1, 1, 1, 1, 1, False, rc))
                       for rc in ("none", "selective", "full"))
    assert full.time.recompute == pytest.approx(none.time.compute / 3 * (1 - 0.0), rel=0.05)  # head not recomputed
    assert 0 < sel.time.recompute < full.time.recompute
    assert none.time.recompute == 0
    assert full.memory_bytes < sel.memory_bytes < none.memory_bytes


def test_memory_is_the_memory_models():
    base = load_config(f"{EX}/gpt_8_3b.yaml")
    lay = Layout(8, 2, 4, 2, 1, True, "selective")
    s = check_layout(base, hardware("A100-40GB"), Cluster(8, 8), 512, lay)
    cfg = resolve(dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, tensor=8, pipeline=2,
                                                                          sequence_parallel=True),
                                      model=dataclasses.replace(base.model, recompute="selective"),
                                      train=dataclasses.replace(base.train, micro_batch_size=2, global_batch_size=512)),
                  64)
    assert s.memory_bytes == max(st.total for st in predict_memory(cfg, 1, "adamw", "cuda"))


def test_more_bandwidth_or_peak_is_faster():
    base = load_config(f"{EX}/gpt_3_9b.yaml")
    lay = Layout(4, 2, 4, 1, 1, False, "full")
    slow = check_layout(base, hardware("A100-40GB"), Cluster(4, 8), 512, lay)
    fast_net = check_layout(base, hardware("A100-40GB", {"inter_node_gbps": 100}), Cluster(4, 8), 512, lay)
    fast_gpu = check_layout(base, hardware("A100-40GB", {"peak_bf16_tflops": 624}), Cluster(4, 8), 512, lay)
    assert fast_net.time.dp_comm < slow.time.dp_comm and fast_net.time.compute == slow.time.compute
    assert fast_gpu.time.compute == pytest.approx(slow.time.compute / 2)


# --------------------------------------------------------------------------- the example configs


def test_gpt2_345m_is_pure_data_parallel_on_one_node():
    p = plan(load_config(f"{EX}/gpt2_345m.yaml"), A100, Cluster(1, 8), 512)
    best = p.best_per_family()[0].layout
    assert (best.tensor, best.pipeline, best.data) == (1, 1, 8)


def test_gpt_8_3b_needs_model_parallelism_on_40gb():
    hw = hardware("A100-40GB")
    base = load_config(f"{EX}/gpt_8_3b.yaml")
    p = plan(base, hw, Cluster(8, 8), 512, Choices(zero_stage=(1,), recompute=("full",)))
    assert p.rank_of(1, 1) is None  # 8.3B x (2 + 4 fp32 gradient) bytes per parameter alone exceed 36 GiB
    assert any("tp=1 pp=1 dp=64" in f for fams in p.rejected.values() for f in fams)
    megatron = check_layout(base, hw, Cluster(8, 8), 512, Layout(8, 1, 8, 1, 1, False, "full"))  # the paper's tp=8
    assert megatron.memory_bytes <= hw.usable_bytes


def test_gpt_3_9b_plan_fits_and_ranks():
    hw = hardware("A100-40GB")
    p = plan(load_config(f"{EX}/gpt_3_9b.yaml"), hw, Cluster(4, 8), 512)
    best = p.best_per_family()
    assert len(best) >= 3
    assert all(s.memory_bytes <= hw.usable_bytes for s in best)
    assert [s.tokens_per_s for s in best] == sorted((s.tokens_per_s for s in best), reverse=True)


def test_mtnlg_530b_plan_picks_the_published_layout():
    p = plan(load_config(f"{EX}/mtnlg_530b.yaml"), A100, Cluster(280, 8), 1920)
    best = p.best_per_family()[0].layout
    assert (best.tensor, best.pipeline, best.data) == (8, 35, 8)


# --------------------------------------------------------------------------- the command


def test_cli_json_and_write(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["plan", "--config", f"{EX}/gpt_3_9b.yaml", "--nodes", "4", "--gpus-per-node", "8", "--gpu",
                 "A100-40GB", "--json", "--top", "3", "--write", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    keys = {"tensor", "pipeline", "data", "micro_batch_size", "zero_stage", "sequence_parallel", "recompute",
            "memory_gb", "step_time_s", "tflops_per_gpu", "mfu"}
    assert keys <= set(rows[0])
    assert rows[0]["step_time_s"] <= rows[1]["step_time_s"]
    cfg = resolve(load_config(out / "run.yaml"), 32)  # what `mtnlg train --config out/run.yaml` resolves
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.data) == (rows[0]["tensor"], rows[0]["pipeline"],
                                                                               rows[0]["data"])
    assert cfg.train.micro_batch_size == rows[0]["micro_batch_size"] and cfg.model.recompute == rows[0]["recompute"]
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == rows[0]["zero_stage"]
    assert ds["optimizer"]["type"] == "AdamW"  # the run's own JSON, stage replaced
    assert yaml.safe_load((out / "run.yaml").read_text())["deepspeed_config"] == str(out / "ds_config.json")


def test_cli_layout_scores_one_layout(capsys):
    assert main(["plan", "--config", f"{EX}/mtnlg_530b.yaml", "--nodes", "280", "--gpus-per-node", "8", "--gpu",
                 "A100-80GB", "--layout", "tp=8,pp=35,mb=1,zero=1,sp=off,recompute=full"]) == 0
    text = capsys.readouterr().out
    assert "1 (tp, pp, dp) layouts fit" in text and "full" in text


@pytest.mark.parametrize("argv,needle", [
    (["--gpu", "B200"], "--gpu B200: unknown"),
    (["--layout", "tp=3,pp=1"], "no such layout fits"),
    (["--layout", "tp=8"], "give at least tp=T,pp=P"),
    (["--gpu-memory-gb", "-1"], "must be positive"),
    (["--global-batch-size", "7"], "no such layout fits"),
])
def test_cli_bad_input_is_one_line(argv, needle, capsys):
    base = ["plan", "--config", f"{EX}/gpt2_345m.yaml", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "A100-80GB"]
    args = base + argv
    if "--gpu" in argv:  # replace the default --gpu
        args = base[:-2] + argv
    if argv[0] == "--global-batch-size":
        args += ["--layout", "tp=1,pp=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_cli_missing_config_is_one_line(capsys):
    assert main(["plan", "--config", "nope.yaml", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "cpu"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cpu_profile_reads_a_calibration(tmp_path):
    f = tmp_path / "calibration.json"
    f.write_text(json.dumps({"profile": {"peak_fp32_tflops": 0.2, "peak_bf16_tflops": 1.0, "gemm_efficiency": 0.9,
                                         "memory_gbps": 3.0, "intra_node_gbps": 0.5, "inter_node_gbps": 0.5,
                                         "gather_scatter_slowdown": 2.0, "latency_us": 50.0, "reserved_gib": 0.3}}))
    hw = hardware("cpu", calibration=f)
    assert (hw.peak_fp32_tflops, hw.gather_scatter_slowdown, hw.link_efficiency) == (0.2, 2.0, 1.0)
    assert hw.gemm_flops_per_s("fp32") == pytest.approx(0.18e12)


def test_collective_fit_recovers_latency_and_bandwidth():
    from mtnlg.bench.comm import _fit

    steps_moved = [(2, 2**20), (2, 2**24), (1, 2**22), (1, 2**26)]
    times = [s * 5e-5 + m / 0.7e9 for s, m in steps_moved]
    latency, inv_bw = _fit(steps_moved, times)
    assert latency == pytest.approx(5e-5, rel=1e-6) and 1 / inv_bw == pytest.approx(0.7e9, rel=1e-6)


def test_each_cost_term_against_a_closed_form():
    """Every term of the step time, for the 18.4B model of Narayanan et al. at tp 8 x dp 32 (pp 1, ZeRO-0, full
    recompute) and at tp 2 x pp 4 x dp 32, against its closed form written out here from the paper and the ring
    model (not from mtnlg's spec FLOPs or memory model): compute 72 B s l h^2 (1 + s/6h + V/12lh) per step split
    over the ranks, recompute 24 B s l h^2 (1 + s/6h), six all-reduces of (b, s, h) per layer, the dp all-reduce of
    the fp16 gradients, the optimizer's 36 bytes per parameter, and the bubble (pp - 1) x a micro batch's stage
    time with p2p messages of a tp-th of the activation. Dropping or doubling any one term fails it."""
    from mtnlg.plan.planner import score

    base = load_config(f"{EX}/narayanan2021/n18_4b.yaml")
    batch, world = 1024, 256
    for tp, pp, dp, mb in [(8, 1, 32, 4), (2, 4, 32, 1)]:
        layout = Layout(tp, pp, dp, mb, 0, False, "full")
        scored, _ = score(base, A100, Cluster(world // 8, 8), batch, layout)
        got = scored.time.breakdown()
        m = resolve(from_dict({"model": dataclasses.asdict(base.model)}), 1).model
        s, L, h, V, e = m.seq_length, m.num_layers, m.hidden_size, m.padded_vocab_size, 2
        per_rank = batch // dp  # sequences each model replica trains on per step
        rate = A100.gemm_flops_per_s("fp16")
        lat = A100.latency_us * 1e-6
        nvlink, ib = A100.intra_node_gbps * 1e9 * 0.8, A100.inter_node_gbps * 1e9 * 0.8
        flops_fwd_layer = 24 * s * h**2 * (1 + s / (6 * h))  # one layer's forward, per sequence
        flops_head = 2 * s * h * V
        if pp == 1:
            compute = per_rank * (3 * (L * flops_fwd_layer + flops_head)) / tp / rate
            recompute = per_rank * L * flops_fwd_layer / tp / rate
            ar = 2 * (tp - 1) / tp * mb * s * h * e / nvlink + 2 * (tp - 1) * lat
            small = 3 * (2 * (tp - 1) / tp * mb * s * 4 / nvlink + 2 * (tp - 1) * lat)
            tp_comm = per_rank // mb * (6 * L * ar + 2 * ar + small)
            params = L * 12 * h**2 / tp + V * h / tp + L * 13 * h / tp + s * h + 2 * h  # ~: checked loosely below
            assert got["compute"] == pytest.approx(compute, rel=1e-3)
            assert got["recompute"] == pytest.approx(recompute, rel=1e-3)
            assert got["tp_comm"] == pytest.approx(tp_comm, rel=2e-3)
            assert got["bubble"] == 0.0 and got["p2p"] == 0.0
            dp_comm = 2 * (dp - 1) / dp * params * 2 / ib + 2 * (dp - 1) * lat  # fp16 gradients, across nodes
            assert got["dp_comm"] == pytest.approx(dp_comm, rel=0.01)
            assert got["optimizer"] == pytest.approx(36 * params / (A100.memory_gbps * 1e9 * 0.8), rel=0.01)
        else:  # the bubble: every stage but the slowest once, i.e. (pp - 1) x a micro batch's stage time
            m_micro = per_rank // mb
            busy = got["compute"] + got["recompute"] + got["memory_bound"] + got["tp_comm"] + got["p2p"]
            assert got["bubble"] == pytest.approx((pp - 1) * busy / m_micro, rel=0.05)
            act = mb * s * h * e / tp  # one stage-to-stage message: a tp-th of the activation, across nodes
            ag = (tp - 1) / tp * mb * s * h * e / nvlink + (tp - 1) * lat  # re-gathered in the tp group
            tied = (V * h * 2 / tp) / ib + 2 * lat  # the tied embedding's fp16 gradient summed by first and last stage
            p2p = m_micro * 2 * (lat + act / ib + ag) + tied
            assert got["p2p"] == pytest.approx(p2p, rel=0.01)


def _best_tflops(cfg, tp: int, pp: int, dp: int, batch: int, nodes: int) -> float:
    """The planner's best TFLOP/s per GPU for one (tp, pp, dp) over micro batch sizes (full recompute, no SP,
    ZeRO-0 as Megatron-LM 2021 ran), among the layouts that fit."""
    from mtnlg.plan.planner import score

    best = 0.0
    for mb in (1, 2, 4, 8, 16):
        if batch % (dp * mb):
            continue
        scored, fits = score(cfg, A100, Cluster(nodes, 8), batch, Layout(tp, pp, dp, mb, 0, False, "full"))
        if fits:
            best = max(best, scored.tflops_per_gpu)
    return best


def _model(layers: int, hidden: int, heads: int):
    base = load_config(f"{EX}/narayanan2021/n145_6b.yaml")
    return dataclasses.replace(base, model=dataclasses.replace(base.model, num_layers=layers, hidden_size=hidden,
                                                               num_attention_heads=heads))


@pytest.mark.parametrize("batch", [32, 128, 512])
@pytest.mark.parametrize("axis", ["pipeline", "tensor"])
def test_model_parallelism_replacing_data_parallelism_costs_throughput(axis, batch):
    """Narayanan et al. 2021, Figures 14 and 15 (a 5.9B GPT on 64 A100s, batch 32, 128, 512): throughput falls as
    pipeline (with tensor 1) or tensor (with pipeline 1) parallelism grows at data parallelism's expense. The term
    that makes the planner agree: a dp group's inter-node traffic runs over as many of its node's NICs as it has
    ranks there (``mtnlg.plan.cost.dp_rails``)."""
    cfg = _model(32, 3840, 32)  # 5.9B (12 l h^2 + V h)
    sizes = [2, 4, 8, 16] if axis == "pipeline" else [2, 4, 8]
    got = [_best_tflops(cfg, 1 if axis == "pipeline" else n, n if axis == "pipeline" else 1, 64 // n, batch, 8)
           for n in sizes]
    print(f"\n5.9B, batch {batch}, {axis} size {sizes}: {[round(g, 1) for g in got]} TFLOP/s per GPU")
    assert all(g > 0 for g in got) and all(a > b for a, b in zip(got, got[1:])), got


@pytest.mark.parametrize("batch", [
    32,
    128,
    pytest.param(512, marks=pytest.mark.xfail(strict=True, reason=(
        "the planner ranks tp4 x pp16 0.4% above tp8 x pp8 (164.0 vs 163.3 TFLOP/s; tp2 x pp32 153.0): a tie within "
        "the model's error, but not the paper's ordering"))),
])
def test_tensor_8_pipeline_8_is_best_for_162b_on_64_gpus(batch):
    """Narayanan et al. 2021, Figure 13: the paper's 162.2B GPT (32 layers "to support pipeline-parallel size of
    32", 128 heads, hidden 20480) on 64 A100s: tensor 8 x pipeline 8 beats tensor 4 x pipeline 16 and tensor 2 x
    pipeline 32 at batch 32, 128 and 512 (Takeaway #1: tensor parallelism up to the GPUs of a node, then pipeline).
    With 32 layers, a stage of pp 32 holds one block, and the last also the LM head: the stages cannot be balanced,
    which is what the paper measured (this test used a 90-layer stand-in of the same size before, which balances
    well at every pp, and failed at batch 128 and 512). The planner reproduces batch 32 and 128; batch 512 is a
    strict expected failure (a 0.4% tie the other way)."""
    cfg = _model(32, 20480, 128)  # 162.2B by the paper's count 12 l h^2 (1 + 13/12h + (V + s)/12lh)
    got = {tp: _best_tflops(cfg, tp, 64 // tp, 1, batch, 8) for tp in (8, 4, 2)}
    print(f"\n162B, batch {batch}: TFLOP/s per GPU by tp (pp = 64 / tp): {got}")
    assert got[8] > got[4] and got[8] > got[2], got
