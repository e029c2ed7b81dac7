"""Knowledge distillation: the vocab-parallel KL term against a single-process reference from full logits (values
and gradients, tp = 1 and tp = 2), and a distillation run in tensor 2 x pipeline 2 whose first-step loss and
gradient norm equal a single-process reference (teacher and student at tp = 1, full logits, torch's own KL and
cross entropy). The teacher is trained in another layout (tp 1 x pp 2 x dp 2, ZeRO-1) in the same launch, so its
weights go through the any-layout reader. One launch of 4 ranks holds every multi-rank check."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.dist_helper import ds_config, run_distributed

TOL = 1e-5  # fp32
TEACHER = {"architecture": "llama", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
           "vocab_size": 96, "seq_length": 32}
STUDENT = {**TEACHER, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "num_kv_heads": 2}
TEMPERATURE, ALPHA = 2.0, 0.6
TEACHER_ITERS = 40  # a teacher that has learned the data: its KL term is a large part of the student's loss


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    """Per-token KL(teacher || student) at ``temperature`` from full logits (padding columns dropped): torch's own."""
    log_q = F.log_softmax(student[..., :vocab].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher[..., :vocab].float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def kl_errors(student_full: torch.Tensor, teacher_full: torch.Tensor, vocab: int, temperature: float, group,
              rank: int, tp: int) -> dict[str, float]:
    """Max abs differences of this rank's KL (values, gradient of its student slice) from the reference."""
    from mtnlg.parallel import vocab_parallel_kl_divergence

    s = student_full.chunk(tp, -1)[rank].clone().requires_grad_()
    t = teacher_full.chunk(tp, -1)[rank].clone()
    ref_s = student_full.clone().requires_grad_()
    kl = vocab_parallel_kl_divergence(s, t, group, vocab, temperature)
    ref = reference_kl(ref_s, teacher_full, vocab, temperature)
    w = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1))  # a weighted sum: every row's gradient
    (kl * w).sum().backward()
    (ref * w).sum().backward()
    grad_ref = ref_s.grad.chunk(tp, -1)[rank]
    return {"fwd": float((kl - ref).detach().abs().max()), "grad": float((s.grad - grad_ref).abs().max()),
            "kl_size": float(ref.detach().abs().max())}


def kl_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int, float]]:
    """(name, student logits, teacher logits, vocab, T): padded vocabularies, one where the second half (tp = 2's
    second rank) is all padding, and a teacher close to the student (small KL from large logits)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 96, generator=g) * 4
    t = torch.randn(3, 5, 96, generator=g) * 4
    return [("padded_T1", s, t, 77, 1.0), ("padded_T2", s, t, 77, 2.0), ("second_half_padding", s, t, 40, 1.5),
            ("close", s, s + 0.05 * t, 96, 1.0)]


def test_kl_single_process_matches_reference():
    for name, s, t, vocab, temp in kl_cases():
        err = kl_errors(s, t, vocab, temp, None, 0, 1)
        assert err["kl_size"] > 1e-3, name  # a real divergence, not zero against zero
        assert err["fwd"] <= TOL and err["grad"] <= TOL, (name, err)


def run_cfg(model: dict, tp: int, pp: int, iters: int, save: str | None = None, distill: dict | None = None,
            **train):
    from mtnlg.config import from_dict

    raw = {"model": model, "parallel": {"tensor": tp, "pipeline": pp},
           "train": {"iters": iters, "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4,
                     "warmup_iters": 0, "log_interval": 1, "seed": 11, "peak_tflops": 1.0, **train},
           "data": {"synthetic": {"branching": 4, "seed": 3}},
           "checkpoint": {"save": save}, "deepspeed_config": ds_config(1)}
    if distill is not None:
        raw["distill"] = distill
    return from_dict(raw)


def student_cfg(teacher: str, save: str | None = None, iters: int = 3):
    return run_cfg(STUDENT, 2, 2, iters, save, {"teacher": teacher, "temperature": TEMPERATURE, "alpha": ALPHA},
                   eval_interval=iters, eval_iters=1)


def _distill_checks(rank: int, world: int, root: str) -> dict:
    from mtnlg.config import resolve
    from mtnlg.parallel import ParallelState
    from mtnlg.training.distill import load_teacher, open_teacher, teacher_config, teacher_memory
    from mtnlg.training.loop import train

    out: dict = {}
    # --- the KL term at tp = 2 (groups {0, 1} and {2, 3}, each checked against the full-logit reference)
    ps = ParallelState.create(2, 2)
    for name, s, t, vocab, temp in kl_cases():
        out[f"kl_{name}"] = kl_errors(s, t, vocab, temp, ps.tp_group, ps.tp_rank, 2)

    # --- a teacher trained in another layout: tp 1 x pp 2 x dp 2, ZeRO-1 (weights in the optimizer partitions)
    teacher = f"{root}/teacher"
    train(run_cfg(TEACHER, 1, 2, iters=TEACHER_ITERS, save=teacher))

    # --- the student distilled in tp 2 x pp 2
    summary = train(student_cfg(teacher, save=f"{root}/student"))
    out["losses"], out["grad_norms"], out["val_losses"] = summary.losses, summary.grad_norms, summary.val_losses

    # --- the teacher's weights on a last-stage rank: the bytes model-info predicts
    if ps.is_last_stage:
        cfg = resolve(student_cfg(teacher), world)
        tcfg = teacher_config(open_teacher(cfg.distill), cfg.model, ps.tp_size)
        model = load_teacher(open_teacher(cfg.distill), tcfg, ps, torch.device("cpu"), torch.float32)
        out["teacher_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["teacher_bytes_predicted"] = teacher_memory(tcfg, 2, ps.tp_size, "fp32").weights
        out["teacher_trainable"] = sum(p.requires_grad for p in model.parameters())
    return out


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return run_distributed(_distill_checks, 4, args=(str(root),)), root


@pytest.mark.parametrize("case", [c[0] for c in kl_cases()])
def test_kl_tp2_matches_reference(distill_run, case):
    results, _ = distill_run
    for r in results:
        err = r[f"kl_{case}"]
        assert err["fwd"] <= TOL and err["grad"] <= TOL, err


def reference_step(teacher_dir: Path, break_teacher=None) -> tuple[float, float, float]:
    """(loss, gradient norm, LM loss) of the student's first step computed in one process from full logits: the
    student's initial weights (layout-independent init), the teacher merged to tp = 1, the same micro batches.
    ``break_teacher(model)``: a change to the teacher's weights before the step."""
    from mtnlg.checkpoint import load_native_model
    from mtnlg.config import resolve
    from mtnlg.model import GPTModel
    from mtnlg.parallel import ParallelState
    from mtnlg.training.loop import micro_batches
    from mtnlg.training.sources import build_sources

    cfg = resolve(student_cfg(str(teacher_dir)), 4)
    teacher, _, _ = load_native_model(teacher_dir)
    if break_teacher is not None:
        with torch.no_grad():
            break_teacher(teacher)
    student = GPTModel.from_config(student_cfg(str(teacher_dir)).model, seed=cfg.train.seed)  # at tp = 1
    source, _ = build_sources(cfg)
    batches = micro_batches(source, 0, cfg, ParallelState.single(), torch.device("cpu"))
    assert len(batches) == 4
    vocab, total, lm_total = cfg.model.vocab_size, 0.0, 0.0
    for ids, labels in batches:
        s = student(ids)  # (B, T, vocab) full logits
        with torch.no_grad():
            t = teacher(ids)
        kl = reference_kl(s, t, vocab, TEMPERATURE).mean()
        lm = F.cross_entropy(s.reshape(-1, vocab), labels.reshape(-1))
        loss = (ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * lm) / len(batches)
        loss.backward()
        total, lm_total = total + float(loss.detach()), lm_total + float(lm.detach()) / len(batches)
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in student.parameters()))
    return total, norm, lm_total


def test_distill_tp2_pp2_first_step_matches_reference(distill_run):
    results, root = distill_run
    first = results[0]
    for r in results[1:]:  # every rank reports the same losses
        assert r["losses"] == first["losses"]
    loss, norm, lm = reference_step(root / "teacher")
    assert first["losses"][1] == pytest.approx(loss, rel=TOL), (first["losses"][1], loss)
    kl_share = (loss - (1 - ALPHA) * lm) / loss
    assert kl_share > 0.1, kl_share  # the teacher matters: 12.8% of the loss (a 2-step teacher: 0.8%)

    def wrong_tp_shard(teacher):  # what a teacher reading the other tp rank's shard of one layer's q, k, v sees
        w = teacher.get_submodule("1").attn.qkv.weight
        w.copy_(torch.cat([half.flip(0) for half in w.chunk(2, dim=0)]))

    broken, _, _ = reference_step(root / "teacher", wrong_tp_shard)
    assert abs(broken - loss) > 50 * TOL * loss, (broken, loss)  # ~97x the tolerance above (a 2-step teacher: 3.8x)
    assert first["grad_norms"][1] == pytest.approx(norm, rel=1e-4), (first["grad_norms"][1], norm)
    assert all(math.isfinite(v) for v in first["losses"].values())
    assert first["losses"][3] < first["losses"][1]


def test_distill_validation_loss_is_the_lm_loss(distill_run):
    """Validation reports the LM loss alone (comparable with runs without distillation): the saved student's LM loss
    on the validation batches, computed in one process."""
    from mtnlg.checkpoint import load_native_model
    from mtnlg.config import resolve
    from mtnlg.parallel import ParallelState
    from mtnlg.training.loop import micro_batches
    from mtnlg.training.sources import build_sources

    results, root = distill_run
    val = results[0]["val_losses"]
    assert sorted(val) == [3]
    cfg = resolve(student_cfg(str(root / "teacher")), 4)
    student, _, _ = load_native_model(root / "student")
    _, valid = build_sources(cfg)
    batches = micro_batches(valid, 0, cfg, ParallelState.single(), torch.device("cpu"), count=4)
    with torch.no_grad():
        lm = sum(float(student(ids, labels)) for ids, labels in batches) / len(batches)
    assert val[3] == pytest.approx(lm, rel=TOL), (val[3], lm)


def test_teacher_memory_prediction_is_exact(distill_run):
    results, _ = distill_run
    last = [r for r in results if "teacher_bytes" in r]
    assert len(last) == 2  # the two tp ranks of the last stage
    for r in last:
        assert r["teacher_bytes"] == r["teacher_bytes_predicted"]
        assert r["teacher_trainable"] == 0


def _cli(args: list[str]) -> tuple[int, str, str]:
    from mtnlg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_model_info_reports_teacher_and_refuses_other_vocab(distill_run, tmp_path):
    import yaml

    from mtnlg.config import to_dict

    _, root = distill_run
    raw = to_dict(student_cfg(str(root / "teacher")))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = _cli(["model-info", "--config", str(tmp_path / "run.yaml"), "--world-size", "4"])
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("distillation teacher"))
    assert "4 layers, hidden 64" in line and "no gradients or optimizer states" in line

    raw["model"]["vocab_size"] = 100  # another tokenizer
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    code, out, err = _cli(["model-info", "--config", str(tmp_path / "run.yaml"), "--world-size", "4"])
    lines = [ln for ln in err.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert code != 0 and len(lines) == 1, err
    assert "vocab_size 96" in lines[0] and "same tokenizer" in lines[0]


@pytest.mark.parametrize("bad, words", [
    ({"teacher": None}, "distill.teacher is not set"),
    ({"temperature": 0.0}, "distill.temperature"),
    ({"alpha": 1.5}, "distill.alpha"),
])
def test_distill_config_errors(bad, words):
    from mtnlg.config import ConfigError, resolve

    cfg = student_cfg("/nonexistent")
    for k, v in bad.items():
        setattr(cfg.distill, k, v)
    with pytest.raises(ConfigError, match=words):
        resolve(cfg, 4)


def test_import_hf_teacher_gives_the_hf_logits(tmp_path):
    """An `mtnlg import-hf` output as the teacher (weights-only, module files) at the student's sequence length and
    vocabulary padding: its logits equal the Hugging Face model's; a raw HF directory is refused with one line."""
    import dataclasses

    from mtnlg.config import DistillConfig, resolve
    from mtnlg.convert.hf_import import import_hf
    from mtnlg.errors import JobError
    from mtnlg.parallel import ParallelState
    from mtnlg.training.distill import load_teacher, open_teacher, teacher_config
    from tests.helpers import SEQ, VOCAB, hf_model, sample, save_hf

    hf = hf_model("llama").eval()
    save_hf(hf, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported")
    student = run_cfg({**STUDENT, "vocab_size": VOCAB, "seq_length": SEQ // 2}, 1, 1, 1)
    student = resolve(dataclasses.replace(student, model=dataclasses.replace(student.model,
                                                                             make_vocab_size_divisible_by=64)), 1)
    ckpt = open_teacher(DistillConfig(teacher=str(tmp_path / "imported")))
    tcfg = teacher_config(ckpt, student.model, 1)
    assert (tcfg.padded_vocab_size, tcfg.seq_length, tcfg.num_layers) == (student.model.padded_vocab_size,
                                                                          SEQ // 2, 4)
    teacher = load_teacher(ckpt, tcfg, ParallelState.single(), torch.device("cpu"), torch.float32)
    ids = sample(seq=SEQ // 2)
    with torch.no_grad():
        ours = teacher.hidden_and_logits(ids)[..., :VOCAB]
        theirs = hf(ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())
    with pytest.raises(JobError, match="import-hf"):
        open_teacher(DistillConfig(teacher=str(tmp_path / "hf")))
