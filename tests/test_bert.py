"""The BERT family (megatron_bert, bert): HF parity and 3D layout parity, in three multi-rank launches.

- HF parity: a random HF MegatronBertForPreTraining and BertForPreTraining, imported at (1,1,1) and at tp 2 x pp 2:
  the MLM and sentence-order logits equal HF's (padded sentence pairs), the export round trip is bit-exact and
  ``export-hf --verify`` passes, and one SGD step trained by mtnlg's engines at (1,1,1) and (2,2,2) (tp 2 x pp 2 x
  dp 2) gives HF's loss and HF's gradient for every parameter.
- Pretraining layout parity (fp32, 5 AdamW steps + one SGD step): losses, gradient norms and per-parameter
  gradients of (2,1,1), (1,2,1), (2,2,2) and ZeRO-3 over 2 ranks (every parameter partitioned) equal (1,1,1)'s.
- Fine-tuning heads (classification, multiple choice, spans): HF logits, and one SGD step at (2,2,1) and (2,1,2)
  against HF's loss and gradients; a stopped and resumed run at tp 2 x pp 2 is bit-exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtnlg.cli import main as cli_main
from tests.dist_helper import ds_config, run_distributed
from tests.helpers import DROPOUT, SGD_LR, STEPS, max_rel, run_config, sgd_step_config, sgd_update, update_rel_diff

ARCHS = ("megatron_bert", "bert")
HF = {"megatron_bert": ("MegatronBertConfig", "MegatronBertForPreTraining"),
      "bert": ("BertConfig", "BertForPreTraining")}
VOCAB, SEQ = 96, 32
LOGIT_TOL = 1e-5  # max abs difference relative to max(1, max |logit|)
RTOL = 1e-5  # losses, grad norms, per-parameter gradients (relative)
MICRO, GLOBAL = 2, 4  # the HF-parity SGD step: two micro batches (accumulated at dp 1, one per rank at dp 2)
DATA = "{branching: 4, seed: 3}"
# world -> (tp, pp, zero, sequence parallel)
PARITY = {1: [(1, 1, 1, False)], 2: [(2, 1, 1, False), (2, 1, 1, True), (1, 2, 1, False), (1, 1, 3, False)],
          8: [(2, 2, 1, False)]}


def hf_bert(arch: str, model_class: str | None = None, **config):
    """A tiny random HF model (default: the pretraining class) with random norm weights and biases (a swapped norm
    or a lost bias cannot hide)."""
    import transformers

    config_class = getattr(transformers, HF[arch][0])
    torch.manual_seed(ARCHS.index(arch))
    cfg = config_class(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, initializer_range=0.1, layer_norm_eps=1e-5, **config)
    model = getattr(transformers, model_class or HF[arch][1])(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.split(".")[-2] == "ln":
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model.eval()


def import_config(import_dir: Path, tp: int, pp: int, save: str, sp: bool = False):
    """The run config import-hf wrote, for one saved SGD step on synthetic BERT samples."""
    from mtnlg.config import load_config

    return load_config(import_dir / "mtnlg_config.yaml", [f"parallel.sequence_parallel={str(sp).lower()}",
        f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"deepspeed_config={ds_config(1, 'sgd')}",
        f"data.synthetic={DATA}", "data.tokenizer=null", "train.iters=1", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={GLOBAL}", f"train.lr={SGD_LR}", "train.min_lr=0", "train.lr_decay=constant",
        "train.warmup_iters=0", "train.weight_decay=0", "train.clip_grad=0", "train.log_interval=1",
        "train.peak_tflops=1.0", f"checkpoint.save={save}", "checkpoint.interval=0",
    ])


def _train_all(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """Train each run in turn on this process group: scratch runs (``run_config``), one-step SGD runs, and one-step
    SGD runs from an import-hf output."""
    from mtnlg.training.loop import train

    out = []
    for run in runs:
        run = dict(run)
        kind = run.pop("kind")
        if kind == "import":
            cfg = import_config(Path(run["import_dir"]), run["tp"], run["pp"], run["save"], run.get("sp", False))
        elif kind == "sgd":
            cfg = sgd_step_config(**run)
        else:
            cfg = run_config(**run)
        summary = train(cfg)
        out.append({"losses": summary.losses, "grad_norms": summary.grad_norms, "zero3": summary.zero3_partitioned,
                    "stopped": summary.stopped})
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """arch -> {hf: the HF model, 111 / 2x2: import-hf outputs, back: export-hf --verify of the 2x2 one}."""
    root = tmp_path_factory.mktemp("bert-hf")
    out = {}
    for arch in ARCHS:
        model = hf_bert(arch)
        model.save_pretrained(str(root / arch))
        paths = {"hf": model, "dir": root / arch}
        for name, (tp, pp) in {"111": (1, 1), "2x2": (2, 2)}.items():
            paths[name] = root / f"{arch}-{name}"
            assert cli_main(["import-hf", "--model", str(root / arch), "--output", str(paths[name]),
                             "--set", f"parallel.tensor={tp}", "--set", f"parallel.pipeline={pp}"]) == 0
        paths["back"] = root / f"{arch}-back"
        assert cli_main(["export-hf", "--checkpoint", str(paths["2x2"]), "--output", str(paths["back"]),
                         "--verify"]) == 0
        out[arch] = paths
    return out


@pytest.fixture(scope="module")
def trained(imported, tmp_path_factory):
    """key -> result of every training run, in three launches (1, 2 and 8 ranks): ('adamw'|'sgd', tp, pp, dp,
    zero) for megatron_bert trained from scratch, ('hf', arch, tp, pp, dp) for one SGD step from an import."""
    root = tmp_path_factory.mktemp("bert-train")
    out = {}
    for world, layouts in PARITY.items():
        runs, keys = [], []
        for tp, pp, zero, sp in layouts:
            dp = world // (tp * pp)
            common = {"architecture": "megatron_bert", "tp": tp, "pp": pp, "zero": zero, "sp": sp}
            runs.append({"kind": "adamw", **common})
            keys.append(("adamw", tp, pp, dp, zero) + (("sp",) if sp else ()))
            save = str(root / f"sgd-tp{tp}pp{pp}dp{dp}z{zero}{'sp' if sp else ''}")
            runs.append({"kind": "sgd", "save": save, **common})
            keys.append(("sgd", tp, pp, dp, zero) + (("sp",) if sp else ()))
        if world in (1, 8):  # HF parity of one SGD step: (1,1,1) and tp 2 x pp 2 x dp 2
            tp, pp = (1, 1) if world == 1 else (2, 2)
            for arch in ARCHS:
                src = imported[arch]["111" if world == 1 else "2x2"]
                runs.append({"kind": "import", "import_dir": str(src), "tp": tp, "pp": pp,
                             "save": str(root / f"hf-{arch}-{world}")})
                keys.append(("hf", arch, tp, pp, world // (tp * pp)))
        results = run_distributed(_train_all, world, args=(runs,))
        for r in results[1:]:  # every rank reports the same dp-averaged, pipeline-broadcast losses
            assert [x["losses"] for x in r] == [x["losses"] for x in results[0]]
        for key, run, result in zip(keys, runs, results[0]):
            out[key] = {**result, "save": run.get("save")}
    return out


# --------------------------------------------------------------------------- HF parity


@torch.no_grad()
def _logit_diff(model, native) -> tuple[float, float]:
    """(max abs difference, tolerance) of HF's and mtnlg's logits (MLM and SOP; or the task head's) on padded
    sentence pairs."""
    from mtnlg.convert.hf.megatron_bert import hf_outputs, verify_inputs

    inputs = verify_inputs(native.cfg, batch=4)
    assert int(inputs[2].sum()) < inputs[2].numel()  # some rows are padded
    ref = hf_outputs(model, inputs)
    got = native(inputs)
    got = got if isinstance(got, tuple) else (got,)
    diff = max(float((g - r).abs().max()) for g, r in zip(got, ref))
    return diff, LOGIT_TOL * max(1.0, max(float(r.abs().max()) for r in ref))


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_logits_after_import_and_round_trip(imported, arch):
    import transformers

    from mtnlg.checkpoint import load_native_model

    paths = imported[arch]
    model = paths["hf"]
    for name in ("111", "2x2"):
        native, run_cfg, _ = load_native_model(paths[name])
        diff, tol = _logit_diff(model, native.eval())
        print(f"\n{arch} imported at {name}: max |dlogit| {diff:.2e} (tolerance {tol:.2e})")
        assert diff <= tol
    assert (run_cfg.parallel.tensor, run_cfg.parallel.pipeline) == (2, 2)
    back = getattr(transformers, HF[arch][1]).from_pretrained(str(paths["back"]), local_files_only=True)
    a, b = model.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact round trip


def hf_step(model, import_dir: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """HF's loss of the first global batch (the mean of its micro batches' losses: MLM mean + SOP, or the task's)
    and every parameter's gradient, by mtnlg's full parameter names (mapped by the adapter's key map, tied weights
    summed as HF ties them)."""
    from mtnlg.config import resolve
    from mtnlg.convert import keymaps
    from mtnlg.data.bert_synthetic import synthetic_bert_sources
    from mtnlg.model.layout import groups
    from mtnlg.model.registry import family

    cfg = resolve(import_config(import_dir, 1, 1, "unused"), 1)
    train_src, _ = synthetic_bert_sources(cfg)
    head = cfg.model.family_knobs.head
    model = model.train()  # no dropout in these models
    model.zero_grad()
    total = 0.0
    for m in range(GLOBAL // MICRO):
        (tokens, types, padding, *_), labels = family(cfg.model).collate(
            [train_src[i] for i in range(m * MICRO, (m + 1) * MICRO)])
        kwargs = {"input_ids": tokens, "token_type_ids": types, "attention_mask": padding}
        if head == "pretrain":
            kwargs |= {"labels": labels[0].masked_fill(labels[1] == 0, -100), "next_sentence_label": labels[2]}
        elif head == "span":
            kwargs |= {"start_positions": labels[:, 0], "end_positions": labels[:, 1]}
        else:
            kwargs["labels"] = labels
        out = model(**kwargs)
        (out.loss / (GLOBAL // MICRO)).backward()
        total += float(out.loss.detach()) / (GLOBAL // MICRO)
    grads = {n: p.grad for n, p in model.named_parameters()}
    tied = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}
    out = {}
    for group in groups(cfg.model):
        mapped = keymaps.from_hf(cfg.model, group, lambda name, shape: grads[tied.get(name, name)])
        out.update({group.full(k): v for k, v in mapped.items()})
    model.eval()
    return total, out


@pytest.mark.parametrize("arch", ARCHS)
def test_one_sgd_step_equals_hf(imported, trained, arch):
    """One SGD step trained by mtnlg at (1,1,1) and at tp 2 x pp 2 x dp 2 from an HF import: HF's loss, and every
    parameter moves by -lr x HF's gradient."""
    from mtnlg.checkpoint import full_state_dict

    paths = imported[arch]
    loss, grads = hf_step(paths["hf"], paths["111"])
    want = {k: -SGD_LR * g for k, g in grads.items()}
    for tp, pp, dp, src in [(1, 1, 1, "111"), (2, 2, 2, "2x2")]:
        run = trained[("hf", arch, tp, pp, dp)]
        before = full_state_dict(paths[src])
        rel = abs(run["losses"][1] - loss) / loss
        got = sgd_update(run["save"], arch, before=before)
        print(f"\n{arch} SGD step at ({tp},{pp},{dp}) vs HF: loss {rel:.1e}, per-parameter gradients:")
        assert rel < RTOL and update_rel_diff(got, want) < RTOL


# --------------------------------------------------------------------------- layout parity


@pytest.mark.parametrize("tp,pp,dp,zero,sp", [(2, 1, 1, 1, ()), (2, 1, 1, 1, ("sp",)), (1, 2, 1, 1, ()),
                                               (2, 2, 2, 1, ()), (1, 1, 2, 3, ())])
def test_pretraining_layout_parity(trained, tp, pp, dp, zero, sp):
    base, got = trained[("adamw", 1, 1, 1, 1)], trained[("adamw", tp, pp, dp, zero, *sp)]
    loss, norm = max_rel(got["losses"], base["losses"]), max_rel(got["grad_norms"], base["grad_norms"])
    grads = update_rel_diff(sgd_update(trained[("sgd", tp, pp, dp, zero, *sp)]["save"], "megatron_bert"),
                            sgd_update(trained[("sgd", 1, 1, 1, 1)]["save"], "megatron_bert"))
    print(f"\nmegatron_bert ({tp},{pp},{dp}) ZeRO-{zero}{' SP' if sp else ''} vs (1,1,1): losses {loss:.1e}, "
          f"grad norms {norm:.1e}, first-step gradients {grads:.1e}")
    assert loss < RTOL and norm < RTOL and grads < RTOL
    # the steps really update the model (5 steps of masked LM are too few to show learning on these walks)
    assert abs(base["losses"][5] - base["losses"][3]) > 0.01 and min(base["grad_norms"].values()) > 0.1
    if zero == 3:
        split, total = got["zero3"]
        assert split == total > 10  # every parameter partitioned, not just the big ones


# --------------------------------------------------------------------------- fine-tuning heads

TASKS = {  # HF class -> (arch, model.head, config)
    "MegatronBertForSequenceClassification": ("megatron_bert", "classify", {"num_labels": 3}),
    "MegatronBertForMultipleChoice": ("megatron_bert", "multiple_choice", {}),
    "MegatronBertForQuestionAnswering": ("megatron_bert", "span", {}),
    "BertForSequenceClassification": ("bert", "classify", {"num_labels": 3}),
}
TASK_LAYOUTS = [(2, 2, 1, False), (2, 1, 2, False), (2, 1, 2, True)]  # (tp, pp, dp, sequence parallel), 4 ranks


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """HF class -> {hf: the HF model, dir, 111 / tp2pp2 / tp2pp1: import-hf outputs, runs: one SGD step from the
    import at each of TASK_LAYOUTS}; "resume" -> a megatron_bert run with dropout at tp 2 x pp 2: uninterrupted,
    stopped by train.exit_interval, resumed (4 ranks, one launch)."""
    root = tmp_path_factory.mktemp("bert-tasks")
    out, runs, keys = {}, [], []
    resume = {"kind": "adamw", "architecture": "megatron_bert", "tp": 2, "pp": 2, "iters": 2 * STEPS,
              "model": DROPOUT}
    ckpt = str(root / "resume")
    runs += [resume, {**resume, "save": ckpt, "exit_interval": STEPS}, {**resume, "save": ckpt, "load": ckpt}]
    keys += [("resume", "full"), ("resume", "first"), ("resume", "second")]
    out["resume"] = {}
    for name, (arch, _, config) in TASKS.items():
        model = hf_bert(arch, name, **config)
        model.save_pretrained(str(root / name))
        paths = {"hf": model}
        for tp, pp in [(1, 1), (2, 2), (2, 1)]:
            paths[f"tp{tp}pp{pp}"] = root / f"{name}-tp{tp}pp{pp}"
            assert cli_main(["import-hf", "--model", str(root / name), "--output", str(paths[f"tp{tp}pp{pp}"]),
                             "--set", f"parallel.tensor={tp}", "--set", f"parallel.pipeline={pp}"]) == 0
        for tp, pp, dp, sp in TASK_LAYOUTS:
            runs.append({"kind": "import", "import_dir": str(paths[f"tp{tp}pp{pp}"]), "tp": tp, "pp": pp, "sp": sp,
                         "save": str(root / f"sgd-{name}-{tp}{pp}{dp}{sp}")})
            keys.append((name, tp, pp, dp, sp))
        out[name] = paths
    for key, run, result in zip(keys, runs, run_distributed(_train_all, 4, args=(runs,))[0]):
        out[key[0]][key[1:] if key[0] != "resume" else key[1]] = {**result, "save": run.get("save")}
    return out


def test_resume_is_exact(tasks):
    """A megatron_bert run with dropout at tp 2 x pp 2 stopped by train.exit_interval and resumed gives the
    uninterrupted run's losses and gradient norms bit for bit (masking, sentence order and dropout resume too)."""
    full, first, second = (tasks["resume"][k] for k in ("full", "first", "second"))
    assert first["stopped"] == "train.exit_interval" and sorted(first["losses"]) == list(range(1, STEPS + 1))
    assert sorted(second["losses"]) == list(range(STEPS + 1, 2 * STEPS + 1))
    assert {**first["losses"], **second["losses"]} == full["losses"]
    assert {**first["grad_norms"], **second["grad_norms"]} == full["grad_norms"]


@pytest.mark.parametrize("name", list(TASKS))
def test_task_heads_equal_hf(tasks, name):
    """Fine-tuning heads imported from HF: logits equal HF's at (1,1,1) and from tp 2 x pp 2; one SGD step trained
    at (2,2,1), (2,1,2) and (2,1,2) with sequence parallelism gives HF's loss and every parameter's HF gradient."""
    from mtnlg.checkpoint import full_state_dict, load_native_model

    paths = tasks[name]
    for src in ("tp1pp1", "tp2pp2"):
        native, run_cfg, _ = load_native_model(paths[src])
        assert run_cfg.model.family_knobs.head == TASKS[name][1]
        diff, tol = _logit_diff(paths["hf"], native.eval())
        print(f"\n{name} imported at {src}: max |dlogit| {diff:.2e} (tolerance {tol:.2e})")
        assert diff <= tol
    loss, grads = hf_step(paths["hf"], paths["tp1pp1"])
    want = {k: -SGD_LR * g for k, g in grads.items()}
    for tp, pp, dp, sp in TASK_LAYOUTS:
        run = paths[(tp, pp, dp, sp)]
        rel = abs(run["losses"][1] - loss) / loss
        got = sgd_update(run["save"], "unused", before=full_state_dict(paths[f"tp{tp}pp{pp}"]))
        print(f"{name} SGD step at ({tp},{pp},{dp}){' SP' if sp else ''} vs HF: loss {rel:.1e}, gradients:")
        assert rel < RTOL and update_rel_diff(got, want) < RTOL


# --------------------------------------------------------------------------- one process


def test_synthetic_samples_and_collate():
    """Synthetic BERT samples have the data side's format, are a function of the index only, and collate into the
    model's inputs and the loss's labels."""
    from mtnlg.config import resolve
    from mtnlg.data.bert_synthetic import synthetic_bert_sources
    from mtnlg.model.registry import family

    cfg = resolve(run_config("megatron_bert"), 1)
    train_src, valid_src = synthetic_bert_sources(cfg)
    samples = [train_src[i] for i in range(64)]
    s = samples[0]
    assert {k: v.shape for k, v in s.items()} == {**{k: (SEQ,) for k in ("tokens", "types", "labels", "loss_mask",
                                                                         "padding_mask")}, "is_random": ()}
    assert all(np.array_equal(train_src[7][k], samples[7][k]) for k in s)  # deterministic
    assert not np.array_equal(valid_src[7]["tokens"], samples[7]["tokens"])
    masked = np.concatenate([x["loss_mask"] for x in samples])
    real = np.concatenate([x["padding_mask"] for x in samples])
    assert 0.1 < masked.sum() / real.sum() < 0.2 and 0.3 < np.mean([x["is_random"] for x in samples]) < 0.7
    assert any(x["padding_mask"].sum() < SEQ for x in samples)  # short pairs, padded
    for x in samples:
        assert np.all((x["labels"] >= 0) == (x["loss_mask"] == 1))
    inputs, labels = family(cfg.model).collate(samples[:3])
    assert [t.shape for t in inputs] == [(3, SEQ)] * 4 and [t.shape for t in labels] == [(3, SEQ), (3, SEQ), (3,)]
    assert torch.equal(inputs[3], labels[1])  # ``predicted``: the rows the MLM head runs on


@pytest.mark.parametrize("key,value,message", [
    ("model.mask_prob", "1.5", "model.mask_prob = 1.5 must be in (0, 1)"),
    ("model.num_classes", "1", "model.num_classes = 1 must be >= 2 for the classification head"),
    ("model.num_kv_heads", "2", "BERT has one key/value head per query head"),
])
def test_bad_config_one_line(tmp_path, capsys, key, value, message):
    cfg = tmp_path / "bert.yaml"
    cfg.write_text("model: {architecture: megatron_bert, num_layers: 2, hidden_size: 64, num_attention_heads: 4, "
                   "vocab_size: 96, seq_length: 32}\nparallel: {tensor: 2}\n")
    extra = ["--set", "model.head=classify"] if key == "model.num_classes" else []
    assert cli_main(["model-info", "--config", str(cfg), "--world-size", "2", "--set", f"{key}={value}", *extra]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_model_info_and_plan(tmp_path, capsys):
    """model-info and plan reach BERT through the registry: sizes, memory per stage, ranked layouts."""
    cfg = tmp_path / "bert.yaml"
    cfg.write_text("model: {architecture: megatron_bert, num_layers: 24, hidden_size: 1024, num_attention_heads: 16, "
                   "vocab_size: 30592, seq_length: 512}\ntrain: {micro_batch_size: 4, precision: bf16}\n"
                   "parallel: {tensor: 2, pipeline: 2}\n")
    assert cli_main(["model-info", "--config", str(cfg), "--world-size", "8"]) == 0
    info = capsys.readouterr().out
    assert "megatron_bert model: 336.30M parameters" in info and "tp=2 pp=2 dp=2" in info
    assert cli_main(["plan", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "8", "--gpu", "A100-80GB",
                     "--global-batch-size", "64", "--json"]) == 0
    import json

    plans = json.loads(capsys.readouterr().out)
    assert plans and all(p["memory_gb"] > 0 and p["tflops_per_gpu"] > 0 for p in plans)
