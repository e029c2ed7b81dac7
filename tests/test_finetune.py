"""``mtnlg finetune`` and ``mtnlg evaluate --task`` (docs/bert.md): one 2-rank launch pretrains a tiny BERT at
tp 2 on the default corpus and fine-tunes it at pp 2 (another layout) on ``mtnlg demo-tasks`` MNLI; the saved
task_results.json has sane metrics, ``evaluate --task`` agrees with a metric recomputed from its own predictions,
and the fine-tuned model exported to HF (``export-hf --verify``) predicts exactly what ``evaluate`` predicts
(the trained head is the one exported). Bad inputs: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtnlg.cli import main
from tests.dist_helper import ds_config, run_distributed
from tests.helpers import digest, hf_model

TINY = {"architecture": "megatron_bert", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "seq_length": 64}


def write_config(path: Path, tp: int, pp: int, save: Path, lr: float = 1e-3, precision: str = "fp32",
                 seed: int = 5) -> Path:
    cfg = {"model": TINY, "parallel": {"tensor": tp, "pipeline": pp},
           "train": {"iters": 2, "micro_batch_size": 8, "global_batch_size": 16, "lr": lr, "min_lr": lr / 10,
                     "warmup_iters": 1, "log_interval": 5, "precision": precision, "seed": seed, "peak_tflops": 1.0},
           "checkpoint": {"save": str(save)}, "deepspeed_config": ds_config(1)}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _pretrain_then_finetune(rank: int, world: int, pre_cfg: str, ft_cfg: str, mnli: str, save: str) -> int:
    assert main(["train", "--config", pre_cfg]) == 0  # tp 2: the default corpus, MLM + SOP
    return main(["finetune", "--config", ft_cfg, "--task", "mnli", "--train-data", f"{mnli}/train.tsv",
                 "--valid-data", f"{mnli}/dev_matched.tsv,{mnli}/dev_copy.tsv", "--pretrained", save, "--epochs", "2"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "tasks"
    assert main(["demo-tasks", "--output", str(out), "--limit-modules", "200", "--max-examples", "64"]) == 0
    return out


@pytest.fixture(scope="module")
def finetuned(demo, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    pre = write_config(d / "pre.yaml", 2, 1, d / "pre")
    ft = write_config(d / "ft.yaml", 1, 2, d / "ft", seed=6)  # another seed: another random init than pretraining
    (demo / "mnli" / "dev_copy.tsv").write_bytes((demo / "mnli" / "dev_matched.tsv").read_bytes())  # a 2nd valid set
    codes = run_distributed(_pretrain_then_finetune, 2, args=(str(pre), str(ft), str(demo / "mnli"), str(d / "pre")))
    assert codes == [0, 0]
    return d


def test_finetune_writes_task_results(finetuned, demo):
    res = json.loads((finetuned / "ft" / "task_results.json").read_text())
    assert res["task"] == "mnli" and res["labels"] == ["contradiction", "entailment", "neutral"]
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    dev, copy = str(demo / "mnli" / "dev_matched.tsv"), str(demo / "mnli" / "dev_copy.tsv")
    for e in res["epochs"]:
        assert set(e["valid"]) == {dev, copy}
        assert e["valid"][dev] == e["valid"][copy]  # the same file scored twice: the same metrics
        assert 0.0 <= e["valid"][dev]["accuracy"] <= 100.0 and e["valid"][dev]["total"] == 12
        assert 0.5 < e["train_loss"] < 2.0  # 3 classes: ln 3 = 1.1 at the start
    assert [e["iteration"] for e in res["epochs"]] == [4, 8]  # 64 samples / global batch 16 per epoch
    assert (finetuned / "ft" / "global_step8" / "complete").exists()


def test_the_pretrained_encoder_is_loaded_and_the_head_is_new(finetuned):
    from mtnlg.checkpoint import full_state_dict

    pre, ft = full_state_dict(finetuned / "pre"), full_state_dict(finetuned / "ft")
    head = {n for n in ft if ".classifier." in n}
    assert head and not head & set(pre)  # the classifier is new; the MLM / SOP heads are gone
    assert not {n for n in ft if ".transform." in n or ".binary." in n or n.endswith("lm.bias")}
    shared = sorted(set(ft) & set(pre))
    assert len(shared) == len(ft) - len(head)  # everything else, the pooler included, came from pretraining
    # 8 Adam steps of lr <= 1e-3 move a weight by < 1e-2; a fresh init (seed 6, not 5) would differ by ~0.1
    moved = max(float((ft[n] - pre[n]).abs().max()) for n in shared)
    assert moved < 0.02, moved


def test_evaluate_matches_its_predictions_and_hf_export(finetuned, demo, tmp_path):
    from mtnlg.tasks.mnli import read
    from mtnlg.tasks.registry import get_task

    data = demo / "mnli" / "dev_matched.tsv"
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--task", "mnli", "--checkpoint", str(finetuned / "ft"), "--data", str(data),
                 "--output", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    examples = read(data)
    preds = res["predictions"]
    assert [p["id"] for p in preds] == [e.guid for e in examples]
    assert [p["gold"] for p in preds] == [e.label for e in examples]
    right = sum(p["prediction"] == e.label for p, e in zip(preds, examples))
    assert res["metrics"]["accuracy"] == pytest.approx(100.0 * right / len(examples))
    assert res["metrics"]["total"] == len(examples)
    # the last epoch's accuracy on the same file, computed by the 2-rank pipeline during fine-tuning
    ft = json.loads((finetuned / "ft" / "task_results.json").read_text())["epochs"][-1]["valid"][str(data)]
    assert ft["accuracy"] == pytest.approx(res["metrics"]["accuracy"])

    hf_dir = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(finetuned / "ft"), "--output", str(hf_dir), "--verify"]) == 0
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == \
        ["MegatronBertForSequenceClassification"]
    out_hf = tmp_path / "eval_hf.json"
    assert main(["evaluate", "--task", "mnli", "--hf", str(hf_dir), "--data", str(data), "--output", str(out_hf),
                 "--seq-length", "64", "--device", "cpu"]) == 0
    hf = json.loads(out_hf.read_text())
    assert [p["prediction"] for p in hf["predictions"]] == [p["prediction"] for p in preds]
    assert hf["metrics"] == res["metrics"]
    # and HF's own forward, argmax by hand: the class names evaluate predicted
    import torch
    import transformers

    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.tasks.mnli import LABELS

    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    f = get_task("mnli").features(examples, load_tokenizer(str(hf_dir)), 64)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(f["tokens"]), token_type_ids=torch.from_numpy(f["types"]),
                       attention_mask=torch.from_numpy(f["padding_mask"])).logits
    assert [LABELS[i] for i in logits.argmax(-1).tolist()] == [p["prediction"] for p in preds]


def _gpt_checkpoint(tmp_path: Path) -> Path:
    src = tmp_path / "gpt_hf"
    hf_model("gpt2").save_pretrained(str(src))
    assert main(["import-hf", "--model", str(src), "--output", str(tmp_path / "gpt")]) == 0
    return tmp_path / "gpt"


def test_bad_inputs_one_line_nothing_written(finetuned, demo, tmp_path, capsys):
    mnli = demo / "mnli"
    cfg = write_config(tmp_path / "ft.yaml", 1, 1, tmp_path / "save")
    args = ["--config", str(cfg), "--train-data", str(mnli / "train.tsv"),
            "--valid-data", str(mnli / "dev_matched.tsv")]
    gpt = _gpt_checkpoint(tmp_path)
    capsys.readouterr()
    before = digest(tmp_path)
    cases = [
        (["finetune", "--task", "nli", *args], "--task 'nli' is not a task"),
        (["finetune", "--task", "mnli", *args, "--pretrained", str(gpt)], "holds a gpt2 model (gpt family)"),
        (["evaluate", "--task", "nli", "--checkpoint", str(finetuned / "ft"), "--data", str(mnli / "dev_matched.tsv"),
          "--output", str(tmp_path / "x.json")], "--task 'nli' is not a task"),
        (["evaluate", "--task", "mnli", "--checkpoint", str(gpt), "--data", str(mnli / "dev_matched.tsv"),
          "--output", str(tmp_path / "x.json")], "holds a gpt2 model (gpt family)"),
        (["evaluate", "--task", "race", "--checkpoint", str(finetuned / "ft"), "--data", str(demo / "race" / "dev"),
          "--output", str(tmp_path / "x.json")], "has the 'classify' head but --task race needs 'multiple_choice'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert digest(tmp_path) == before and not (tmp_path / "save").exists() and not (tmp_path / "x.json").exists()
