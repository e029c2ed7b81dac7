"""Evaluation and generation on a model trained on a trivially predictable corpus (each word is
always followed by the same word): known answers, native == Hugging Face export, native layouts
under a launcher, lm-evaluation-harness offline, and KV-cached generation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.dist_helper import ds_config, run_distributed

ROOT = Path(__file__).resolve().parent.parent
WORDS = "apple banana cherry dragon eagle falcon grape hazel iris jasmine kiwi lemon mango nectar olive pepper".split()


def _doc(rng) -> str:
    start, n = int(rng.integers(0, 16)), int(rng.integers(30, 60))
    return " ".join(WORDS[(start + k) % 16] for k in range(n))


def _train(rank, world, data_dir, save):
    from mtnlg.config import from_dict
    from mtnlg.training.loop import train

    train(from_dict({
        "model": {"architecture": "llama", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "num_kv_heads": 2, "seq_length": 64},
        "train": {"iters": 200, "micro_batch_size": 8, "global_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_iters": 10, "log_interval": 50, "peak_tflops": 1.0},
        "data": {"prefix": f"{data_dir}/corpus", "tokenizer": f"{data_dir}/tok", "split": "100,0,0"},
        "checkpoint": {"save": save},
        "deepspeed_config": str(ROOT / "ds_configs" / "zero1.json"),
    }))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Corpus -> tokenizer -> .bin/.idx -> trained checkpoint -> HF export -> (tp2, pp2) import, and eval data."""
    from mtnlg.convert.hf_export import export_hf
    from mtnlg.convert.hf_import import import_hf
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    docs = [_doc(rng) for _ in range(400)]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer(docs, vocab_size=400, output_dir=d / "tok")
    preprocess([str(d / "corpus.jsonl")], "text", tok, str(d / "corpus"), workers=1, log=lambda *_: None)
    run_distributed(_train, 1, args=(str(d), str(d / "ckpt")))
    export_hf(str(d / "ckpt"), str(d / "hf"), verify=True)
    import_hf(str(d / "hf"), str(d / "ckpt_tp2pp2"), overrides=["parallel.tensor=2", "parallel.pipeline=2"])

    held_out = [_doc(rng) for _ in range(12)]
    cloze = [{"text": t} for t in held_out]
    choice = []
    for t in held_out:
        words = t.split()
        wrong = WORDS[(WORDS.index(words[-1]) + 5) % 16]
        choice.append({"context": " ".join(words[:-1]), "choices": [wrong, words[-1]], "label": 1})
    for name, rows in [("ppl", cloze[:4]), ("cloze", cloze), ("choice", choice),
                       ("wiki", [{"page": r["text"]} for r in cloze[:4]])]:
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


TASK_FILES = {"perplexity": "ppl", "cloze": "cloze", "choice": "choice"}


def _run_tasks(model, d: Path) -> dict[str, dict]:
    from mtnlg.eval.tasks import read_jsonl, run_task

    out = {}
    for task, name in TASK_FILES.items():
        kwargs = {"stride": 24} if task == "perplexity" else {}
        out[task] = run_task(task, model.scorer, read_jsonl(d / f"{name}.jsonl"), model.eod_id, **kwargs)
    return out


@pytest.fixture(scope="module")
def native_results(env):
    from mtnlg.eval.loading import open_model

    return _run_tasks(open_model(checkpoint=str(env / "ckpt")), env)


def test_tasks_have_the_known_answers(native_results):
    r = native_results
    assert r["cloze"]["accuracy"] == 1.0 and r["cloze"]["perplexity"] < 1.2
    assert r["choice"]["acc"] == 1.0 and r["choice"]["acc_norm"] == 1.0
    ppl = r["perplexity"]
    # every word is one token here, so word and token perplexity coincide; only each document's first
    # word is unpredictable
    assert ppl["tokens"] == ppl["words"] and ppl["token_perplexity"] == pytest.approx(ppl["word_perplexity"])
    assert 1.0 < ppl["token_perplexity"] < 1.3
    assert ppl["bits_per_byte"] == pytest.approx(ppl["nll_per_token"] * ppl["tokens"] / ppl["bytes"] / math.log(2))


def test_perplexity_scores_every_token_once_whatever_the_stride():
    from mtnlg.eval.tasks import perplexity, windows

    class Constant:  # log p = -1 for every token
        max_length = 8

        def encode(self, text):
            return [1] * len(text.split())

        def score(self, seqs):
            assert all(len(s) - 1 <= self.max_length for s in seqs)
            return [(np.full(len(s) - 1, -1.0), np.zeros(len(s) - 1, bool)) for s in seqs]

    rows = [{"text": "a " * 30}, {"text": "b " * 5}]
    for stride in (1, 3, 8):
        r = perplexity(Constant(), rows, eod_id=0, stride=stride)
        assert r["tokens"] == 35 and r["token_perplexity"] == pytest.approx(math.e)
    for n, length, stride in [(30, 8, 3), (5, 8, 8), (100, 16, 16)]:
        scored = [p for _, end, first in windows(n, length, stride) for p in range(first, end)]
        assert scored == list(range(1, n + 1))


def test_native_matches_hf_export(env, native_results):
    from mtnlg.eval.loading import open_model

    hf = _run_tasks(open_model(hf=str(env / "hf")), env)
    for task, metrics in native_results.items():
        for key, value in metrics.items():
            assert hf[task][key] == pytest.approx(value, rel=1e-5), (task, key)


def _eval_layout(rank, world, d):
    from mtnlg.eval.loading import open_model

    model = open_model(checkpoint=f"{d}/ckpt_tp2pp2")
    return _run_tasks(model, Path(d))


def test_native_layout_under_a_launcher_matches(env, native_results):
    """The (tp=2, pp=2) checkpoint evaluated by 4 ranks in its own layout gives the same numbers."""
    results = run_distributed(_eval_layout, 4, args=(str(env),))
    for r in results:  # every rank has the scores
        for task, metrics in native_results.items():
            for key, value in metrics.items():
                assert r[task][key] == pytest.approx(value, rel=1e-5), (task, key)


PROMPTS = ["apple banana", "kiwi", "olive pepper apple banana cherry"]


def _generate(rank, world, d):
    from mtnlg.eval.loading import open_model

    gen = open_model(checkpoint=f"{d}/ckpt", for_generation=True).generator
    ids = [gen.encode(p) for p in PROMPTS]
    return {"greedy": gen.generate_ids(ids, 10), "sampled": gen.generate_ids(ids, 10, temperature=1.5, seed=4)}


def test_generation(env):
    from mtnlg.eval.loading import open_model

    native = open_model(checkpoint=str(env / "ckpt"), for_generation=True).generator
    hf = open_model(hf=str(env / "hf"), for_generation=True).generator
    ids = [native.encode(p) for p in PROMPTS]
    greedy = native.generate_ids(ids, 10)
    assert greedy == hf.generate_ids(ids, 10)  # transformers' generate on the export
    assert [native.generate_ids([p], 10)[0] for p in ids] == greedy  # batching changes nothing
    words = native.decode(greedy[0]).split()
    assert words == [WORDS[(2 + k) % 16] for k in range(len(words))]  # it learned the cycle
    a = native.generate_ids(ids, 10, temperature=1.5, top_k=5, top_p=0.9, seed=4)
    assert a == native.generate_ids(ids, 10, temperature=1.5, top_k=5, top_p=0.9, seed=4)
    assert a != native.generate_ids(ids, 10, temperature=1.5, top_k=5, top_p=0.9, seed=5)
    # tensor parallel: two ranks decode exactly what one does
    tp2 = run_distributed(_generate, 2, args=(str(env),))
    one = {"greedy": greedy, "sampled": native.generate_ids(ids, 10, temperature=1.5, seed=4)}
    assert tp2[0] == one and tp2[1] == one


def test_lm_eval_runs_local_tasks_offline(env, native_results, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mtnlg.eval.lm_eval_model import MtnlgLM

    for name, data in [("lambada_local", "cloze"), ("wikitext_local", "wiki"), ("choice_local", "choice")]:
        spec = yaml.safe_load((ROOT / "examples" / "eval" / f"{name}.yaml").read_text())
        spec["dataset_kwargs"]["data_files"]["test"] = str(env / f"{data}.jsonl")
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    model = MtnlgLM(checkpoint=str(env / "ckpt"))
    out = lm_eval.simple_evaluate(model=model, tasks=["lambada_local", "wikitext_local", "choice_local"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    res = out["results"]
    assert res["lambada_local"]["acc,none"] == native_results["cloze"]["accuracy"] == 1.0
    assert res["lambada_local"]["perplexity,none"] == pytest.approx(native_results["cloze"]["perplexity"], rel=1e-5)
    assert res["choice_local"]["acc,none"] == 1.0
    assert 1.0 < res["wikitext_local"]["word_perplexity,none"] < 1.5
    # generate_until, the third request type
    request = type("Req", (), {"args": ("olive pepper", {"until": ["grape"], "max_gen_toks": 8})})()
    assert model.generate_until([request], disable_tqdm=True) == [" apple banana cherry dragon eagle falcon "]


def test_evaluate_cli_writes_results_and_refuses_bad_input(env, tmp_path):
    out = tmp_path / "results.json"
    cmd = [str(Path(sys.executable).parent / "mtnlg"), "evaluate", "--checkpoint", str(env / "ckpt"),
           "--task", "cloze", "--data", str(env / "cloze.jsonl"), "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["accuracy"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "apple banana"}\n{oops\n')
    for args, message in [(["--data", str(bad)], "bad.jsonl:2: malformed JSON"),
                          (["--data", str(tmp_path / "none.jsonl")], "none.jsonl not found")]:
        proc = subprocess.run(cmd[:6] + args, capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def _train_with_downstream(rank, world, d, tasks_dir, save, tp, zero):
    from mtnlg.config import from_dict
    from mtnlg.training.loop import train

    return train(from_dict({
        "model": {"architecture": "gpt2", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "seq_length": 64},
        "parallel": {"tensor": tp},
        "train": {"iters": 12, "micro_batch_size": 8 // (world // tp), "global_batch_size": 8, "lr": 3e-3,
                  "log_interval": 6, "peak_tflops": 1.0},
        "data": {"prefix": f"{d}/corpus", "tokenizer": f"{d}/tok", "split": "100,0,0"},
        "checkpoint": {"save": save},
        "eval": {"tasks": ["lambada_local"], "include_path": tasks_dir, "interval": 6},
        "deepspeed_config": ds_config(zero),
    })).zero3_partitioned


@pytest.mark.parametrize("tp,zero", [(2, 1), (1, 3)])  # ZeRO-3 with the tied gpt2 weight partitioned
def test_downstream_eval_during_training(env, tmp_path, tp, zero):
    from mtnlg.eval.loading import open_model
    from mtnlg.eval.tasks import read_jsonl, run_task

    spec = yaml.safe_load((ROOT / "examples" / "eval" / "lambada_local.yaml").read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(env / "cloze.jsonl")
    (tmp_path / "lambada_local.yaml").write_text(yaml.safe_dump(spec))
    save = tmp_path / "ckpt"
    zero3 = run_distributed(_train_with_downstream, 2, args=(str(env), str(tmp_path), str(save), tp, zero))[0]
    assert zero3 is None if zero < 3 else zero3[0] == zero3[1]  # ZeRO-3: the tied weight is partitioned too
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/lambada_local/acc" in r]
    assert [r["iteration"] for r in evals] == [6, 12]
    # the in-training number (tp=2, live model) equals an offline evaluation of the final checkpoint
    model = open_model(checkpoint=str(save))
    offline = run_task("cloze", model.scorer, read_jsonl(env / "cloze.jsonl"), model.eod_id)
    assert evals[-1]["eval/lambada_local/acc"] == offline["accuracy"]
    assert evals[-1]["eval/lambada_local/perplexity"] == pytest.approx(offline["perplexity"], rel=1e-5)
