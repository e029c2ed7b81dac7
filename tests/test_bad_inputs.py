"""Bad input everywhere: every command answers a mistake with one clear line on stderr and a non-zero
exit, and leaves what is already on disk as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, digest

ROOT = Path(__file__).resolve().parent.parent
MTNLG = str(Path(sys.executable).parent / "mtnlg")





@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A workspace: a run config, a trained ZeRO-0 checkpoint, data, a tokenizer, HF dirs, existing outputs."""
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import train_tokenizer
    from tests.helpers import hf_model, save_hf

    d = tmp_path_factory.mktemp("bad")
    (d / "run.yaml").write_text(TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([MTNLG, "train", "--config", str(d / "run.yaml"), "--set", f"checkpoint.save={d}/ckpt"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    docs = [f"document {i} " + "word " * (i % 7 + 1) for i in range(50)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer(docs, vocab_size=300, output_dir=d / "tok")
    preprocess([str(d / "docs.jsonl")], "text", tok, str(d / "data"), workers=1, log=lambda *_: None)
    shutil.copy(d / "data.idx", d / "cut.idx")
    (d / "cut.bin").write_bytes((d / "data.bin").read_bytes()[:10])  # a truncated .bin
    save_hf(hf_model("gpt2"), d / "hf")
    (d / "albert").mkdir()  # (BERT itself is a family now)
    (d / "albert" / "config.json").write_text(json.dumps({"model_type": "albert", "architectures": ["AlbertModel"]}))
    (d / "binonly").mkdir()
    shutil.copy(d / "hf" / "config.json", d / "binonly" / "config.json")
    (d / "binonly" / "pytorch_model.bin").write_bytes(b"not a safetensors file")
    (d / "existing").mkdir()
    (d / "existing" / "keep.txt").write_text("precious")
    shutil.copytree(d / "ckpt", d / "cutckpt")  # a checkpoint whose model states file was cut short
    shard = d / "cutckpt" / "global_step2" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (d / "notjson.json").write_text("{ nope")
    (d / "ds_contradicts.json").write_text(json.dumps({"train_batch_size": 99}))
    return d


# (name, argv with {w} for the workspace, expected text in the one line, paths that must stay unchanged)
CASES = [
    ("no command", [], "the following arguments are required: COMMAND", []),
    ("unknown command", ["frobnicate"], "invalid choice: 'frobnicate'", []),
    ("train: missing --config", ["train"], "the following arguments are required: --config", []),
    ("train: config not found", ["train", "--config", "{w}/none.yaml"], "none.yaml not found", []),
    ("train: malformed YAML", ["train", "--config", "{w}/notjson.json"], "malformed YAML", []),
    ("train: unknown key", ["train", "--config", "{w}/run.yaml", "--set", "train.itres=3"],
     "unknown key 'train.itres'", []),
    ("train: --set without =", ["train", "--config", "{w}/run.yaml", "--set", "train.iters"],
     "expected KEY=VALUE", []),
    ("train: layout vs world size", ["train", "--config", "{w}/run.yaml", "--set", "parallel.tensor=2"],
     "world size 1 is not divisible by parallel.tensor * parallel.pipeline = 2", []),
    ("train: heads vs tp", ["train", "--config", "{w}/run.yaml", "--set", "model.num_attention_heads=3"],
     "model.hidden_size = 32 is not divisible by model.num_attention_heads = 3", []),
    ("train: ds_config not found", ["train", "--config", "{w}/run.yaml", "--set", "deepspeed_config={w}/no.json"],
     "no.json not found", []),
    ("train: ds_config malformed", ["train", "--config", "{w}/run.yaml", "--set",
                                    "deepspeed_config={w}/notjson.json"], "malformed JSON", []),
    ("train: ds_config contradicts", ["train", "--config", "{w}/run.yaml", "--set",
                                      "deepspeed_config={w}/ds_contradicts.json"],
     "'train_batch_size' is 99 but the run config gives train.global_batch_size = 2", []),
    ("train: bf16 with ZeRO-0", ["train", "--config", "{w}/run.yaml", "--set", "train.precision=bf16"],
     "bf16 needs ZeRO stage >= 1", []),
    ("train: lr is not a number", ["train", "--config", "{w}/run.yaml", "--set", "train.lr=nan"],
     "train.lr = 'nan' must be a finite number", []),
    ("train: save names a file", ["train", "--config", "{w}/run.yaml", "--set",
                                  "checkpoint.save={w}/existing/keep.txt"],
     "keep.txt is an existing file; name a directory", ["existing"]),
    ("train: resume from a truncated shard", ["train", "--config", "{w}/run.yaml", "--set",
                                              "checkpoint.load={w}/cutckpt", "--set", "checkpoint.save={w}/out7"],
     "mp_rank_00_model_states.pt", ["cutckpt"]),
    ("train: data prefix missing", ["train", "--config", "{w}/run.yaml", "--set", "data.synthetic=null",
                                    "--set", "data.prefix={w}/nodata", "--set", "data.tokenizer={w}/tok"],
     "nodata", []),
    ("train: truncated .bin", ["train", "--config", "{w}/run.yaml", "--set", "data.synthetic=null",
                               "--set", "data.prefix={w}/cut", "--set", "data.tokenizer={w}/tok"], "cut.bin", []),
    ("train: tokenizer dir is not one", ["train", "--config", "{w}/run.yaml", "--set", "data.synthetic=null",
                                         "--set", "data.prefix={w}/data", "--set", "data.tokenizer={w}/existing"],
     "existing", ["existing"]),
    ("train: load holds no checkpoint", ["train", "--config", "{w}/run.yaml", "--set",
                                         "checkpoint.load={w}/existing"], "holds no complete checkpoint",
     ["existing"]),
    ("train: checkpoint of another layout", ["train", "--config", "{w}/run.yaml", "--set", "checkpoint.load={w}/ckpt",
                                             "--set", "deepspeed_config=" + str(ROOT / "ds_configs" / "zero1.json")],
     "convert it first: mtnlg checkpoint reshard", ["ckpt"]),
    ("preprocess: input missing", ["preprocess", "--input", "{w}/none.jsonl", "--tokenizer", "{w}/tok",
                                   "--output-prefix", "{w}/data"], "none.jsonl", ["data.bin", "data.idx"]),
    ("preprocess: malformed line", ["preprocess", "--input", "{w}/bad.jsonl", "--tokenizer", "{w}/tok",
                                    "--output-prefix", "{w}/data"], "bad.jsonl:2", ["data.bin", "data.idx"]),
    ("preprocess: tokenizer missing", ["preprocess", "--input", "{w}/docs.jsonl", "--tokenizer", "{w}/notok",
                                       "--output-prefix", "{w}/data"], "notok", ["data.bin", "data.idx"]),
    ("tokenizer: vocab too small", ["tokenizer", "train", "--input", "{w}/docs.jsonl", "--vocab-size", "100",
                                    "--output", "{w}/existing"], "vocab", ["existing"]),
    ("merge-data: prefix missing", ["merge-data", "--input", "{w}/data", "{w}/nodata", "--output-prefix",
                                    "{w}/data"], "nodata", ["data.bin", "data.idx"]),
    ("export-hf: not a checkpoint", ["export-hf", "--checkpoint", "{w}/existing", "--output", "{w}/out1"],
     "not an mtnlg checkpoint", ["existing"]),
    ("export-hf: no such iteration", ["export-hf", "--checkpoint", "{w}/ckpt", "--iteration", "7", "--output",
                                      "{w}/out2"], "iteration 7", ["ckpt"]),
    ("export-hf: output exists", ["export-hf", "--checkpoint", "{w}/ckpt", "--output", "{w}/existing"],
     "--overwrite", ["existing", "ckpt"]),
    ("import-hf: unsupported model", ["import-hf", "--model", "{w}/albert", "--output", "{w}/out3"],
     "model_type 'albert'", ["albert"]),
    ("import-hf: pickle weights", ["import-hf", "--model", "{w}/binonly", "--output", "{w}/out4"],
     "safetensors only", ["binonly"]),
    ("import-hf: bad layout", ["import-hf", "--model", "{w}/hf", "--output", "{w}/out5", "--set",
                               "parallel.tensor=3"], "not divisible by parallel.tensor = 3", ["hf"]),
    ("reshard: ZeRO-0 checkpoint", ["checkpoint", "reshard", "--checkpoint", "{w}/ckpt", "--output", "{w}/out6"],
     "ZeRO stage 0", ["ckpt"]),
    ("reshard: output exists", ["checkpoint", "reshard", "--checkpoint", "{w}/ckpt", "--output", "{w}/existing"],
     "not empty", ["existing", "ckpt"]),
    ("evaluate: two models", ["evaluate", "--checkpoint", "{w}/ckpt", "--hf", "{w}/hf", "--task", "cloze",
                              "--data", "{w}/docs.jsonl"], "give exactly one of --checkpoint", []),
    ("evaluate: unknown task", ["evaluate", "--hf", "{w}/hf", "--task", "poetry", "--data", "{w}/docs.jsonl"],
     "--task 'poetry' is not a task", []),
    ("evaluate: data missing", ["evaluate", "--hf", "{w}/hf", "--task", "cloze", "--data", "{w}/none.jsonl"],
     "none.jsonl not found", []),
    ("evaluate: malformed data", ["evaluate", "--hf", "{w}/hf", "--task", "cloze", "--data", "{w}/bad.jsonl",
                                  "--output", "{w}/existing/keep.txt"], "bad.jsonl:2: malformed JSON", ["existing"]),
    ("evaluate: no tokenizer in checkpoint", ["evaluate", "--checkpoint", "{w}/ckpt", "--task", "cloze",
                                              "--data", "{w}/docs.jsonl"], "no tokenizer", ["ckpt"]),
    ("evaluate: not an HF dir", ["evaluate", "--hf", "{w}/existing", "--task", "cloze", "--data",
                                 "{w}/docs.jsonl"], "cannot load a Hugging Face model", ["existing"]),
    ("generate: too long", ["generate", "--hf", "{w}/hf", "--prompt", "hi", "--max-new-tokens", "100000"],
     "exceeds", []),
]


@pytest.mark.parametrize("name,argv,message,keep", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_damages_nothing(w, name, argv, message, keep):
    before = {k: digest(w / k) for k in keep}
    args = [a.replace("{w}", str(w)) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([MTNLG, *args], env=env, capture_output=True, text=True, timeout=300, cwd=w)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert proc.returncode != 0, proc.stdout[-1000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    for k, was in before.items():
        assert digest(w / k) == was, f"{k} changed"


def test_the_table_is_long_enough():
    assert len(CASES) >= 25
    assert len({c[1][0] if c[1] else "" for c in CASES}) >= 9  # spread over the commands
