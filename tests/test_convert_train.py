"""Converters with training: fine-tuning starts from imported weights (every ZeRO stage, pp > 1), and
models trained under 3D layouts export to HF models that generate exactly what mtnlg's own model does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtnlg.cli import main as convert_main
from tests.dist_helper import ds_config, run_distributed
from tests.helpers import hf_model, load_hf, run_config, save_hf

ROOT = Path(__file__).resolve().parent.parent
LR, MICRO, GLOBAL, BRANCHING, DATA_SEED = 1e-2, 2, 8, 4, 3

# name -> (family, tp, pp, zero stage, precision): fine-tune 2 steps from the tp=2, pp=2 import
FINETUNES = {
    "gpt2-tp2pp2-zero1": ("gpt2", 2, 2, 1, "fp32"),
    "llama-tp2pp2-zero0": ("llama", 2, 2, 0, "fp32"),
    "llama-tp2dp2-zero3": ("llama", 2, 1, 3, "fp32"),
    "gpt2-dp4-zero2": ("gpt2", 1, 1, 2, "fp32"),  # another layout than the import's
}
# name -> (family, tp, pp, zero, precision): load the import into a built engine; check module and fp32 masters
MASTER_CHECKS = {"llama-tp2pp2-zero1-bf16": ("llama", 2, 2, 1, "bf16"),
                 "gpt2-tp2dp2-zero3-bf16": ("gpt2", 2, 1, 3, "bf16")}
# name -> (preset, tp, pp, zero, precision): trained from scratch for 3 steps, checkpoints at 2 and 3
SCRATCH4 = {"gpt2-tp2dp2-zero3": ("gpt2", 2, 1, 3, "fp32"), "llama-scratch-tp2pp2-zero0": ("llama", 2, 2, 0, "fp32"),
            "llama-tp2dp2-zero2-fp16": ("llama", 2, 1, 2, "fp16"),
            # architectures beyond the two originals: q, k, v biases (exports as Qwen2ForCausalLM), and Mistral's
            "qwen2-tp2pp2-zero1": ("qwen2", 2, 2, 1, "fp32"), "mistral-tp2pp2-zero1": ("mistral", 2, 2, 1, "fp32")}
SCRATCH8 = {"llama-tp2pp2dp2-zero1-bf16": ("llama", 2, 2, 1, "bf16")}


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """Nothing from the hub, ever (the spawned ranks inherit the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def finetune_config(import_dir: str, tp: int, pp: int, zero: int, precision: str, iters: int = 2):
    """The run config import-hf wrote, trained on synthetic data with a constant LR and plain AdamW."""
    from mtnlg.config import load_config

    return load_config(Path(import_dir) / "mtnlg_config.yaml", [
        f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"deepspeed_config={ds_config(zero)}",
        f"data.synthetic={{branching: {BRANCHING}, seed: {DATA_SEED}}}", "data.tokenizer=null",
        f"train.iters={iters}", f"train.micro_batch_size={MICRO}", f"train.global_batch_size={GLOBAL}",
        f"train.lr={LR}", "train.lr_decay=constant", "train.warmup_iters=0", "train.weight_decay=0",
        "train.clip_grad=0", "train.log_interval=1", "train.peak_tflops=1.0", f"train.precision={precision}",
    ])


def scratch_config(preset: str, tp: int, pp: int, zero: int, precision: str, save: str):
    cfg = run_config(preset, tp=tp, pp=pp, zero=zero, precision=precision, iters=3, save=save, lr=LR, min_lr=1e-3)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, interval=2))


def _master_check(import_dir: str, tp: int, pp: int, zero: int, precision: str) -> dict:
    """Build an engine, load the import into it, and compare every parameter with the import's values."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from mtnlg.checkpoint import load, plan_load
    from mtnlg.checkpoint.reader import open_checkpoint, shard_for
    from mtnlg.config import resolve
    from mtnlg.parallel import ParallelState
    from mtnlg.training.engine import Engine

    cfg = resolve(finetune_config(import_dir, tp, pp, zero, precision), dist.get_world_size())
    ps = ParallelState.create(tp, pp)
    engine = Engine(cfg, ps, torch.device("cpu"))
    plan = plan_load(cfg, zero, ps)
    assert plan.kind == "weights" and load(engine, plan) == (0, 0)
    params = dict(engine.engine.module.named_parameters())
    lp_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    out = {"lp": 0.0, "master": 0.0, "master_vs_lp_rounding": 0.0, "count": 0, "zero3": engine.zero3_partitioned()}
    ckpt = open_checkpoint(import_dir)
    for group, tensors in ckpt.iter_groups():
        for local, full in tensors.items():
            p = params.get(group.full(local))
            if p is None:
                continue
            want = shard_for(local, full, cfg.model, ps.tp_rank, ps.tp_size)
            if zero == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    lp = p.data.clone()
            else:
                lp = p.data.clone()
            master = safe_get_full_fp32_param(p)
            out["lp"] = max(out["lp"], float((lp.float() - want.to(lp_dtype).float()).abs().max()))
            out["master"] = max(out["master"], float((master - want).abs().max()))
            out["master_vs_lp_rounding"] = max(out["master_vs_lp_rounding"],
                                               float((master - want.to(lp_dtype).float()).abs().max()))
            out["count"] += 1
    return out


def _deepspeed_module_load(import_dir: str, tp: int, pp: int) -> float:
    """DeepSpeed's own ``load_checkpoint(load_module_only=True)`` on an import: max abs weight error."""
    import torch.distributed as dist

    from mtnlg.checkpoint.reader import open_checkpoint, shard_for
    from mtnlg.config import resolve
    from mtnlg.parallel import ParallelState
    from mtnlg.training.engine import Engine

    cfg = resolve(finetune_config(import_dir, tp, pp, 1, "fp32"), dist.get_world_size())
    ps = ParallelState.create(tp, pp)
    engine = Engine(cfg, ps, torch.device("cpu"))
    path, _ = engine.engine.load_checkpoint(import_dir, tag="global_step0", load_module_only=True,
                                            load_optimizer_states=False, load_lr_scheduler_states=False)
    assert path is not None
    params = dict(engine.engine.module.named_parameters())
    worst, seen = 0.0, 0
    for group, tensors in open_checkpoint(import_dir).iter_groups():
        for local, full in tensors.items():
            p = params.get(group.full(local))
            if p is not None:
                want = shard_for(local, full, cfg.model, ps.tp_rank, ps.tp_size)
                worst, seen = max(worst, float((p.data - want).abs().max())), seen + 1
    assert seen == len(params)
    return worst


def _four_ranks(rank: int, world: int, imports: dict[str, str], save_root: str) -> dict:
    from mtnlg.training.loop import train

    res = {"deepspeed_load": {f"tp{tp}pp{pp}": _deepspeed_module_load(imports[f"llama-tp{tp}pp{pp}"], tp, pp)
                              for tp, pp in [(2, 2), (2, 1)]}}
    for name, (family, tp, pp, zero, precision) in FINETUNES.items():
        summary = train(finetune_config(imports[family], tp, pp, zero, precision))
        res[name], res[f"{name}/zero3"] = summary.losses, summary.zero3_partitioned
    for name, (family, tp, pp, zero, precision) in MASTER_CHECKS.items():
        res[name] = _master_check(imports[family], tp, pp, zero, precision)
    for name, spec in SCRATCH4.items():
        summary = train(scratch_config(*spec, save=f"{save_root}/{name}"))
        res[name], res[f"{name}/zero3"] = summary.losses, summary.zero3_partitioned
    return res


def _eight_ranks(rank: int, world: int, save_root: str) -> dict:
    from mtnlg.training.loop import train

    return {name: train(scratch_config(*spec, save=f"{save_root}/{name}")).losses for name, spec in SCRATCH8.items()}


def batch(vocab: int, seq: int, iteration: int) -> torch.Tensor:
    """The global batch of training iteration ``iteration`` (1-based), as every layout reads it."""
    from mtnlg.data.synthetic import MarkovSource

    src = MarkovSource(vocab, BRANCHING, seq, DATA_SEED, stream=0)
    start = (iteration - 1) * GLOBAL
    return torch.stack([torch.from_numpy(src[i]) for i in range(start, start + GLOBAL)])


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """mtnlg's loss: mean cross entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def hf_losses(model, vocab: int, seq: int) -> tuple[float, float]:
    """HF's loss on iteration 1's batch, and on iteration 2's after one AdamW step (same hyperparameters)."""
    model.train()
    b1, b2 = batch(vocab, seq, 1), batch(vocab, seq, 2)
    loss1 = next_token_loss(model(input_ids=b1[:, :-1]).logits, b1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    loss1.backward()
    opt.step()
    with torch.no_grad():
        loss2 = next_token_loss(model(input_ids=b2[:, :-1]).logits, b2)
    return loss1.item(), loss2.item()


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> dict[str, str]:
    """Tiny random HF models (GPT-2; Llama GQA 4/2 heads, untied) imported at tp=2, pp=2 through the CLI."""
    root = tmp_path_factory.mktemp("imports")
    out = {}
    for family in ("gpt2", "llama"):
        src = save_hf(hf_model(family), root / f"{family}_hf")
        assert convert_main(["import-hf", "--model", str(src), "--output", str(root / family),
                             "--set", "parallel.tensor=2", "--set", "parallel.pipeline=2"]) == 0
        out[family] = out[f"{family}-tp2pp2"] = str(root / family)
    assert convert_main(["import-hf", "--model", str(root / "llama_hf"), "--output", str(root / "llama21"),
                         "--set", "parallel.tensor=2"]) == 0
    out["llama-tp2pp1"] = str(root / "llama21")
    return out


@pytest.fixture(scope="module")
def four(imports, tmp_path_factory):
    save_root = tmp_path_factory.mktemp("trained4")
    return run_distributed(_four_ranks, 4, args=(imports, str(save_root)))[0], save_root


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    save_root = tmp_path_factory.mktemp("trained8")
    return run_distributed(_eight_ranks, 8, args=(str(save_root),))[0], save_root


# --------------------------------------------------------------------------- fine-tuning from an import


@pytest.mark.parametrize("name", list(FINETUNES))
def test_finetune_starts_from_imported_weights(four, name):
    family = FINETUNES[name][0]
    losses = four[0][name]
    ref1, ref2 = hf_losses(hf_model(family), 96, 32)
    print(f"\n{name}: mtnlg losses {losses[1]:.6f}, {losses[2]:.6f}; HF {ref1:.6f}, {ref2:.6f}")
    assert sorted(losses) == [1, 2]  # starts at iteration 1: the import is iteration 0
    assert abs(losses[1] - ref1) <= 1e-5 * ref1  # the first step sees exactly the HF weights
    assert abs(losses[2] - ref2) <= 1e-5 * ref2  # fresh AdamW from those weights (masters loaded too)
    assert abs(ref2 - ref1) > 0.05  # the step moved the model enough for stale masters to show


def test_zero3_runs_partition_every_parameter(four):
    """The ZeRO-3 fine-tune and training runs here (tp=2 x dp=2) really split every parameter over dp."""
    runs = [n for n, spec in {**FINETUNES, **SCRATCH4}.items() if spec[3] == 3]
    assert len(runs) == 2
    for name in runs:
        split, total = four[0][f"{name}/zero3"]
        assert split == total > 10, name


def test_deepspeed_reads_imported_files_itself(four):
    """The import's files are DeepSpeed's own layout: its load_checkpoint(load_module_only=True) reads them."""
    assert four[0]["deepspeed_load"] == {"tp2pp2": 0.0, "tp2pp1": 0.0}


@pytest.mark.parametrize("name", list(MASTER_CHECKS))
def test_import_sets_module_and_fp32_masters(four, name):
    r = four[0][name]
    print(f"\n{name}: {r}")
    assert r["count"] >= 10  # rank 0 reports its own stage's parameters
    assert r["lp"] == 0.0  # the bf16 module weights are the imported ones, rounded
    assert r["master"] == 0.0  # DeepSpeed's fp32 masters are the exact fp32 imported values,
    assert r["master_vs_lp_rounding"] > 1e-4  # not copies of the bf16 module weights
    if MASTER_CHECKS[name][3] == 3:
        assert r["zero3"][0] == r["zero3"][1]  # every parameter partitioned


# --------------------------------------------------------------------------- trained checkpoints -> HF


def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with mtnlg's GPTModel (full recompute each step)."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def check_export_generates_like_mtnlg(ckpt: Path, out: Path, iteration: int | None = None) -> float:
    from mtnlg.checkpoint import load_native_model

    args = ["export-hf", "--checkpoint", str(ckpt), "--output", str(out), "--verify"]
    assert convert_main(args + (["--iteration", str(iteration)] if iteration else [])) == 0
    hf = load_hf(out)
    native, _, _ = load_native_model(ckpt, iteration)
    prompt = batch(96, 32, 1)[:4, :8]
    want = greedy(native, prompt, 12)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(got, want), (got, want)
    with torch.no_grad():
        diff = float((hf(input_ids=want).logits - native(want)).abs().max())
    assert diff <= 1e-5
    return diff


def loss_from_checkpoint(ckpt: Path, iteration: int, next_iteration: int) -> float:
    """mtnlg's tp=1 model loaded from global_step<iteration>, evaluated on the next iteration's batch."""
    from mtnlg.checkpoint import load_native_model

    model, _, _ = load_native_model(ckpt, iteration)
    b = batch(96, 32, next_iteration)
    with torch.no_grad():
        return float(next_token_loss(model(b[:, :-1]), b))


@pytest.mark.parametrize("name", [n for n, spec in SCRATCH4.items() if spec[4] == "fp32"])
def test_trained_checkpoint_weights_are_the_trained_ones(four, name):
    """The loss training computed at iteration 3 used the weights saved at iteration 2: the reader gives them."""
    res, save_root = four
    got = loss_from_checkpoint(save_root / name, 2, 3)
    print(f"\n{name}: training loss at iteration 3 {res[name][3]:.6f}; from global_step2 read at tp=1 {got:.6f}")
    assert abs(got - res[name][3]) <= 1e-5 * got
    assert abs(res[name][3] - res[name][1]) > 0.05  # training moved the weights


@pytest.mark.parametrize("name,cls", [("qwen2-tp2pp2-zero1", "Qwen2ForCausalLM"),
                                      ("mistral-tp2pp2-zero1", "MistralForCausalLM")])
def test_more_architectures_train_in_3d_and_export_like_hf(four, tmp_path, name, cls):
    """Qwen2-style (q, k, v biases: trained, saved, merged over tp) and Mistral-style models trained at tp=2 x pp=2
    export to their own HF class with the logits of mtnlg's model (and generate the same tokens)."""
    import json

    diff = check_export_generates_like_mtnlg(four[1] / name, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [cls]
    print(f"\n{name} export ({cls}): max|dlogit| HF vs mtnlg = {diff:.3g}")


def test_zero3_checkpoint_exports_and_generates_like_mtnlg(four, tmp_path):
    _, save_root = four
    diff = check_export_generates_like_mtnlg(save_root / "gpt2-tp2dp2-zero3", tmp_path / "hf")
    print(f"\nZeRO-3 tp=2 dp=2 export: max|dlogit| HF vs mtnlg = {diff:.3g}")
    diff2 = check_export_generates_like_mtnlg(save_root / "gpt2-tp2dp2-zero3", tmp_path / "hf2", iteration=2)
    assert diff2 <= 1e-5


def check_masters_round_to_module(ckpt_dir: Path, layout: tuple, precision: str) -> None:
    """The fp32 masters the reader finds, rounded, are exactly the saved module weights (and hold more)."""
    from mtnlg.checkpoint import open_checkpoint

    ckpt = open_checkpoint(ckpt_dir)
    assert (ckpt.layout.tp, ckpt.layout.pp, ckpt.layout.dp, ckpt.layout.zero_stage) == layout
    assert ckpt.layout.precision == precision and ckpt.source() == "master"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    worst, moved = 0.0, 0
    for group in ckpt.groups:
        masters, module = ckpt.read_group(group, "master"), ckpt.read_group(group, "module")
        for local in group.locals:
            worst = max(worst, float((masters[local].to(dtype).float() - module[local]).abs().max()))
            moved += int(not torch.equal(masters[local], module[local]))
    assert worst == 0.0 and moved > 10


def test_bf16_3d_checkpoint_exports_and_generates_like_mtnlg(eight, tmp_path):
    res, save_root = eight
    ckpt_dir = save_root / "llama-tp2pp2dp2-zero1-bf16"
    check_masters_round_to_module(ckpt_dir, (2, 2, 2, 1), "bf16")
    diff = check_export_generates_like_mtnlg(ckpt_dir, tmp_path / "hf")
    print(f"\nbf16 ZeRO-1 tp=2 pp=2 dp=2 export: max|dlogit| HF vs mtnlg = {diff:.3g}; losses {res[ckpt_dir.name]}")


def test_fp16_zero2_checkpoint_exports_and_generates_like_mtnlg(four, tmp_path):
    res, save_root = four
    ckpt_dir = save_root / "llama-tp2dp2-zero2-fp16"
    check_masters_round_to_module(ckpt_dir, (2, 1, 2, 2), "fp16")
    diff = check_export_generates_like_mtnlg(ckpt_dir, tmp_path / "hf")
    print(f"\nfp16 ZeRO-2 tp=2 dp=2 export: max|dlogit| HF vs mtnlg = {diff:.3g}; losses {res[ckpt_dir.name]}")


def test_reader_agrees_with_deepspeeds_universal_conversion(eight, tmp_path):
    """DeepSpeed's ds_to_universal merges the same fp32 masters over tp, pp and dp, bit for bit."""
    import sys

    from deepspeed.checkpoint import ds_to_universal

    from mtnlg.checkpoint import full_state_dict

    _, save_root = eight
    ckpt_dir = save_root / "llama-tp2pp2dp2-zero1-bf16"
    out = tmp_path / "universal" / "global_step3_universal"
    argv = sys.argv
    sys.argv = ["ds_to_universal", "--input_folder", str(ckpt_dir / "global_step3"), "--output_folder", str(out),
                "--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:
        ds_to_universal.main(ds_to_universal.parse_arguments())
    finally:
        sys.argv = argv
    mine = full_state_dict(ckpt_dir)
    worst = 0.0
    for name, x in mine.items():
        theirs = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)
        theirs = theirs["param"] if isinstance(theirs, dict) else theirs
        assert theirs.shape == x.shape, name
        worst = max(worst, float((theirs.detach() - x).abs().max()))
    assert len(mine) == 1 + 4 * 6 + 1 + 1 and worst == 0.0  # embed, 4 x (norm1, qkv, proj, norm2, fc, proj), norm, head
