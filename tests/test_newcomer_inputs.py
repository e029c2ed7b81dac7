"""What a newcomer hits (issue 26, section 4): each input gets one clear line on stderr and a non-zero exit, and
nothing already on disk changes; the rough edges of a first session (help, examples, resume) are smooth.

Commands run in this process (``mtnlg.cli.main``), so most cases cost milliseconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtnlg.cli import main
from tests.helpers import TINY, digest

ROOT = Path(__file__).resolve().parent.parent





def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(capsys, argv: list[str], message: str, keep: list[Path] = ()) -> str:
    before = {k: digest(k) for k in keep}
    code, out, err = _run(capsys, argv)
    lines = [line for line in err.splitlines() if line.strip() and "[WARNING]" not in line]
    assert code not in (0, None), out[-2000:]
    assert len(lines) == 1, err[-3000:]
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    for k, was in before.items():
        assert digest(k) == was, f"{k} changed"
    return lines[0]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A workspace: a run config, a trained 2-step checkpoint, a tokenizer, prompt/response data."""
    from mtnlg.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("newcomer")
    (d / "run.yaml").write_text(TINY)
    assert main(["train", "--config", str(d / "run.yaml"), "--set", f"checkpoint.save={d}/ckpt"]) == 0
    docs = [f"question {i}: what is {i} plus {i}? answer: {2 * i} " + "word " * (i % 5) for i in range(60)]
    train_tokenizer(docs, vocab_size=300, output_dir=d / "tok")
    (d / "afile").write_text("a file, not a directory")
    (d / "empty.jsonl").write_text("")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "ok"}\n')
    (d / "qa.jsonl").write_text("".join(json.dumps({"prompt": f"what is {i} plus {i}?", "response": f"{2 * i}"})
                                        + "\n" for i in range(8)))
    return d


# ----------------------------------------------------------------------------------------------- data loss
def test_save_into_another_runs_directory_is_refused_and_leaves_it_whole(w, capsys):
    """No checkpoint.load, checkpoint.save naming a finished run: refused (was: overwrote it, appended to its
    metrics.jsonl, exit 0). Resuming it (checkpoint.load = the same directory) stays the way to go on."""
    _one_line(capsys, ["train", "--config", str(w / "run.yaml"), "--set", f"checkpoint.save={w}/ckpt"],
              f"checkpoint.save = {w}/ckpt already holds a run (checkpoint global_step2); resume it with "
              f"--set checkpoint.load={w}/ckpt", keep=[w / "ckpt"])
    (w / "other").mkdir(exist_ok=True)  # another run's directory, saved into while loading a third one
    (w / "other" / "metrics.jsonl").write_text('{"iteration": 1, "loss": 1.0}\n')
    _one_line(capsys, ["train", "--config", str(w / "run.yaml"), "--set", f"checkpoint.save={w}/other",
                       "--set", f"checkpoint.load={w}/ckpt"], "already holds a run (a metrics.jsonl)",
              keep=[w / "other", w / "ckpt"])


# ------------------------------------------------------------------------------- flags out of their range
@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--hf", "{w}/none", "--task", "perplexity", "--data", "{w}/qa.jsonl", "--limit", "-1"],
     "argument --limit: -1 is out of range: give an integer >= 1"),
    (["evaluate", "--hf", "{w}/none", "--task", "perplexity", "--data", "{w}/qa.jsonl", "--stride", "0"],
     "argument --stride: 0 is out of range"),
    (["evaluate", "--hf", "{w}/none", "--task", "generate-match", "--data", "{w}/qa.jsonl", "--max-new-tokens",
      "-1"], "argument --max-new-tokens: -1 is out of range"),
    (["generate", "--hf", "{w}/none", "--prompt", "hi", "--top-p", "2"], "argument --top-p: 2 is not in (0, 1]"),
    (["generate", "--hf", "{w}/none", "--prompt", "hi", "--temperature", "-1"],
     "argument --temperature: -1 is out of range: give a number >= 0"),
    (["generate", "--hf", "{w}/none", "--prompt", "hi", "--top-k", "-5"], "argument --top-k: -5 is out of range"),
    (["generate", "--hf", "{w}/none", "--prompt", "hi", "--max-new-tokens", "-1"],
     "argument --max-new-tokens: -1 is out of range"),
    (["model-info", "--config", "{w}/run.yaml", "--world-size", "0"], "argument --world-size: 0 is out of range"),
    (["plan", "--config", "{w}/run.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "cpu",
      "--global-batch-size", "0"], "argument --global-batch-size: 0 is out of range"),
    (["plan", "--config", "{w}/run.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "cpu",
      "--global-batch-size", "-4"], "argument --global-batch-size: -4 is out of range"),
])
def test_flags_out_of_range_are_usage_errors(w, capsys, argv, message):
    _one_line(capsys, [a.replace("{w}", str(w)) for a in argv], message)


def test_plan_exits_non_zero_when_no_layout_fits(w, capsys):
    code, out, err = _run(capsys, ["plan", "--config", str(ROOT / "examples" / "gpt2_125m.yaml"), "--nodes", "1",
                                   "--gpus-per-node", "2", "--gpu", "A100-40GB", "--gpu-memory-gb", "0.05"])
    assert code == 2 and "no layout fits this model on 2 GPUs" in err, out[-2000:] + err


# -------------------------------------------------------------------------------------------- run config
def test_an_empty_config_is_refused_not_the_default_model(w, capsys):
    (w / "empty.yaml").write_text("")
    _one_line(capsys, ["train", "--config", str(w / "empty.yaml")], f"config file {w}/empty.yaml is empty")


def test_exit_interval_without_save_is_refused_before_training(w, capsys):
    _one_line(capsys, ["train", "--config", str(w / "run.yaml"), "--set", "train.exit_interval=1"],
              "train.exit_interval = 1 stops the run early to be resumed, but checkpoint.save is not set")


def test_save_under_a_file_is_refused_before_training(w, capsys):
    line = _one_line(capsys, ["train", "--config", str(w / "run.yaml"), "--set",
                              f"checkpoint.save={w}/afile/ckpt"], f"{w}/afile is a file, not a directory",
                     keep=[w / "afile"])
    assert "checkpoint.save" in line


def test_loading_a_checkpoint_of_another_model_size_names_the_key(w, capsys):
    _one_line(capsys, ["train", "--config", str(w / "run.yaml"), "--set", "model.hidden_size=64", "--set",
                       f"checkpoint.load={w}/ckpt", "--set", f"checkpoint.save={w}/bigger"],
              "holds a model with model.hidden_size = 32 but the run config has 64", keep=[w / "ckpt"])


def test_a_teacher_that_is_a_file(w, capsys):
    _one_line(capsys, ["train", "--config", str(w / "run.yaml"), "--set", f"distill.teacher={w}/afile"],
              f"distill.teacher = {w}/afile is a file; name the teacher's checkpoint directory")


def test_distillation_logs_the_teacher_and_its_terms(w, capsys):
    """A line that the teacher loaded, and each step's KL and LM terms (log line and metrics.jsonl), which make up
    the logged loss."""
    code, out, err = _run(capsys, ["train", "--config", str(w / "run.yaml"), "--set", f"checkpoint.save={w}/kd",
                                   "--set", f"distill={{teacher: {w}/ckpt, alpha: 0.5, temperature: 2.0}}"])
    assert code == 0, err[-2000:]
    assert f"distill: teacher {w}/ckpt loaded; loss = 0.5 * 2^2 * KL(teacher || student) + 0.5 * LM" in out, out
    records = [json.loads(line) for line in (w / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["distill_kl"] > 0 and r["distill_lm"] > 0
        assert r["loss"] == pytest.approx(0.5 * 4 * r["distill_kl"] + 0.5 * r["distill_lm"], rel=1e-5)
        assert f"kl {r['distill_kl']:.4f} lm {r['distill_lm']:.4f}" in out


def test_model_info_resolves_the_vocabulary_from_the_data_like_train(w, capsys):
    (w / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " + "word " * i}) + "\n"
                                          for i in range(20)))
    assert main(["preprocess", "--input", str(w / "docs.jsonl"), "--tokenizer", str(w / "tok"), "--output-prefix",
                 str(w / "docs"), "--workers", "1"]) == 0
    capsys.readouterr()
    code, out, err = _run(capsys, ["model-info", "--config", str(w / "run.yaml"), "--set", "data.synthetic=null",
                                   "--set", f"data.prefix={w}/docs", "--set", f"data.tokenizer={w}/tok"])
    assert code == 0, err
    assert "vocab 300 (padded 384)" in out, out


# ------------------------------------------------------------------------------------------ SFT data
def _sft(w: Path, src: str, *extra: str) -> list[str]:
    return ["preprocess", "--sft", "--input", str(w / src), "--tokenizer", str(w / "tok"), "--output-prefix",
            str(w / "sftout"), *extra]


def test_sft_inputs(w, capsys):
    (w / "robot.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "robot", "content": "beep"},
                                                            {"role": "assistant", "content": "hello"}]}) + "\n")
    _one_line(capsys, _sft(w, "robot.jsonl"), f"{w}/robot.jsonl:1: unknown chat role 'robot'; use one of")
    _one_line(capsys, _sft(w, "latin1.jsonl"), f"{w}/latin1.jsonl:1: not UTF-8 text (byte 0xe9 at column 16)")
    line = _one_line(capsys, _sft(w, "empty.jsonl"), f"{w}/empty.jsonl holds no examples")
    assert "--overflow" not in line
    line = _one_line(capsys, _sft(w, "qa.jsonl", "--max-length", "3"),
                     "all 8 dropped (no response token within --max-length 3); raise --max-length")
    assert "--overflow" not in line
    _one_line(capsys, _sft(w, "qa.jsonl", "--skip-bad-lines"), "--skip-bad-lines applies to plain documents")
    _one_line(capsys, ["preprocess", "--sft", "--input", str(w / "qa.jsonl"), "--tokenizer", str(w / "tok"),
                       "--output-prefix", str(w / "afile" / "sft")], f"--output-prefix {w}/afile/sft: {w}/afile is an "
              "existing file",
              keep=[w / "afile"])
    assert not list(w.glob("sftout*"))


def test_sft_responses_past_seq_length(w, capsys):
    """Examples whose response starts after model.seq_length train on nothing: all of them is an error, some of
    them a counted line (were: loss 0.0000 and exit 0; silently uncounted)."""
    long_prompt = "word " * 40  # > seq_length 16 tokens
    rows = [{"prompt": long_prompt, "response": "late"}] * 3 + [{"prompt": "what is 1 plus 1?", "response": "2"}] * 5
    (w / "late.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (w / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("late", "mixed"):
        assert main(_sft(w, f"{name}.jsonl")[:-1] + [str(w / name)]) == 0
    capsys.readouterr()
    sft = ["train", "--config", str(w / "run.yaml"), "--set", "data.synthetic=null", "--set",
           f"data.tokenizer={w}/tok", "--set", "data.split=100,0,0", "--set", "train.iters=1"]
    _one_line(capsys, [*sft, "--set", f"data.sft={{prefix: {w}/late}}"],
              f"none of the 3 training examples of {w}/late has a response token within model.seq_length = 16")
    code, out, err = _run(capsys, [*sft, "--set", f"data.sft={{prefix: {w}/mixed}}"])
    assert code == 0, err[-2000:]
    assert (f"data.sft: 3 of 8 training examples of {w}/mixed have no response token within model.seq_length = 16"
            in out), out


# ------------------------------------------------------------------------------- inputs and outputs
def test_outputs_that_name_or_sit_under_a_file(w, capsys):
    keep = [w / "afile", w / "ckpt"]
    _one_line(capsys, ["demo-sft", "--output", str(w / "afile")], f"--output {w}/afile: {w}/afile is an existing "
              "file; name a directory", keep)
    _one_line(capsys, ["corpus", "--output", str(w / "afile")], "is an existing file", keep)
    _one_line(capsys, ["export-hf", "--checkpoint", str(w / "ckpt"), "--output", str(w / "afile" / "hf")],
              f"--output {w}/afile/hf: {w}/afile is a file, not a directory", keep)
    _one_line(capsys, ["tokenizer", "train", "--input", str(w / "qa.jsonl"), "--json-key", "prompt",
                       "--vocab-size", "300", "--output", str(w / "afile" / "tok")], "is a file, not a directory", keep)
    _one_line(capsys, ["preprocess", "--input", str(w / "qa.jsonl"), "--json-key", "prompt", "--tokenizer",
                       str(w / "tok"), "--output-prefix", str(w / "afile" / "x")], f"{w}/afile is an existing file",
              keep)


def test_non_utf8_evaluation_data(w, capsys):
    _one_line(capsys, ["evaluate", "--hf", str(w / "none"), "--task", "cloze", "--data", str(w / "latin1.jsonl")],
              f"{w}/latin1.jsonl:1: not UTF-8 text")


def test_tokenizer_train_suggests_no_flag_it_lacks(w, capsys):
    (w / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    line = _one_line(capsys, ["tokenizer", "train", "--input", str(w / "broken.jsonl"), "--vocab-size", "300",
                              "--output", str(w / "tok2")], f"{w}/broken.jsonl:2")
    assert "--skip-bad-lines" not in line


# ------------------------------------------------------------------------------------------------ rough
def test_help_imports_no_heavy_package():
    """`mtnlg --help` and usage errors need argparse only (was: torch, DeepSpeed and transformers, 13 s cold)."""
    code = ("import sys\nfrom mtnlg.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['evaluate', '--limit', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers', 'numpy') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # else the old code skipped torch too
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:] + proc.stderr[-2000:]


def test_generate_sampling_flags_have_help_and_defaults(capsys):
    code, out, _ = _run(capsys, ["generate", "--help"])
    assert code == 0
    text = " ".join(out.split())
    for flag, words in [("--temperature", "0 = greedy"), ("--top-k", "(default 0)"), ("--top-p", "(default 1)"),
                        ("--max-new-tokens", "(default 64)"), ("--seed", "random seed")]:
        assert flag in text and words in text, (flag, text)


def test_example_configs_work_from_any_directory(tmp_path, monkeypatch):
    from mtnlg.config import load_config

    monkeypatch.chdir(tmp_path)
    for name in ("tiny_3d", "main", "sft_demo", "gpt2_125m", "llama_1b"):
        cfg = load_config(ROOT / "examples" / f"{name}.yaml")
        assert Path(cfg.deepspeed_config).is_file(), (name, cfg.deepspeed_config)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ds.json").write_text("{}")
    (tmp_path / "conf" / "run.yaml").write_text("deepspeed_config: ds.json\n")
    assert load_config("conf/run.yaml").deepspeed_config == str(Path("conf") / "ds.json")
    (tmp_path / "ds.json").write_text("{}")  # one in the working directory wins, as before
    assert load_config("conf/run.yaml").deepspeed_config == "ds.json"


def test_resume_logs_saves_schedule_change_and_keeps_metrics_unique(tmp_path, capsys):
    """A run saving every step, stopped at 2 of 4; the iteration-3 record of a run killed (SIGINT) after logging
    it but before saving; a resume with train.iters = 5: one line per saved checkpoint, one about the schedule,
    no DeepSpeed debug line, and metrics.jsonl holds every iteration once (was: 3 twice)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY)
    save = tmp_path / "ckpt"
    common = ["train", "--config", str(cfg), "--set", f"checkpoint.save={save}", "--set", "checkpoint.interval=1"]
    code, out, err = _run(capsys, [*common, "--set", "train.iters=4", "--set", "train.exit_interval=2"])
    assert code == 0, err[-2000:]
    assert f"saved checkpoint {save}/global_step1" in out.splitlines(), out
    with open(save / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 3, "loss": 9.0}) + "\n")
    code, out, err = _run(capsys, [*common, "--set", f"checkpoint.load={save}", "--set", "train.iters=5"])
    assert code == 0, err[-2000:]
    assert ("note: the learning-rate schedule now decays over 5 iterations, not the checkpoint's 4 (train.iters is "
            "5, was 4); set train.lr_decay_iters=4 to continue the original schedule") in out, out
    assert f"saved checkpoint {save}/global_step3" in out.splitlines(), out
    assert not [line for line in out.splitlines() + err.splitlines() if "[DEBUG]" in line or "[INFO]" in line], \
        out + err
    iterations = [json.loads(line)["iteration"] for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4, 5]


def test_the_default_corpus_is_reported_once_per_run(monkeypatch, tmp_path):
    """A run asks for the default corpus twice (its tokenizer, its dataset); its `corpus:` lines come once."""
    import mtnlg.data.corpus as corpus
    from mtnlg.config import DataConfig
    from mtnlg.data.gpt_dataset import default_data

    calls = []
    monkeypatch.setattr(corpus, "ensure_default_data", lambda cache: calls.append(cache) or ("prefix", "tok"))
    data = DataConfig(cache_dir=str(tmp_path))
    assert default_data(data) == default_data(data) == ("prefix", "tok")
    assert len(calls) == 1


def test_a_command_refused_after_it_joined_a_process_group_leaves_none_behind(tmp_path, capsys):
    """`train` refuses an empty checkpoint.load after it has made its process group. The group is destroyed before
    the exit (one newcomer run in five aborted with exit 134, "terminate called without an active exception",
    when interpreter shutdown destroyed the group's still-joinable threads; not reproduced here, and this is the
    state that allows it)."""
    import torch.distributed as dist

    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY)
    (tmp_path / "empty").mkdir()
    code, out, err = _run(capsys, ["train", "--config", str(cfg), "--set", f"checkpoint.load={tmp_path}/empty"])
    assert code == 2 and "holds no complete checkpoint" in err, err[-2000:]
    assert "layout: tp=1" in out  # refused after the run had set itself up (process group included)
    assert not dist.is_initialized()
