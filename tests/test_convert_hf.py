"""Hugging Face converters, one process: HF -> mtnlg (any layout) -> HF with equal logits, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtnlg.cli import main as convert_main
from tests.helpers import FAMILIES, SEQ, VOCAB, hf_model, load_hf, sample, save_hf

ROOT = Path(__file__).resolve().parent.parent

LOGIT_TOL = 1e-5  # fp32 logits of O(1): max abs difference (measured: <= 1.7e-6)


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """Nothing from the hub, ever."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def cli(*argv: str, capsys=None) -> tuple[int, str]:
    """Run a converter command in-process; (exit code, stderr)."""
    rc = convert_main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


@torch.no_grad()
def max_logit_diff(a, b, ids: torch.Tensor) -> float:
    """Max abs difference of two models' logits; a model is an HF model or an mtnlg GPTModel."""
    def logits(m):
        out = m(input_ids=ids).logits if hasattr(m, "config") else m(ids)
        return out.float()[..., :VOCAB]

    return float((logits(a) - logits(b)).abs().max())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mtnlg.data.tokenizer import train_tokenizer

    docs = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(100)]
    tok = train_tokenizer(docs, 280, tmp_path_factory.mktemp("tok") / "tok")
    return tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer):
    """{family: (HF model, its directory)}; the gpt2 one has a (trained byte-level BPE) tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        out[family] = (model, save_hf(model, root / family, tokenizer if family == "gpt2" else None))
    return out


@pytest.fixture(scope="module")
def roundtrips(hf_dirs, tmp_path_factory):
    """HF -> import-hf (tp=2, pp=2) -> export-hf --verify, for both families, through the CLI."""
    root = tmp_path_factory.mktemp("rt")
    out = {}
    for family, (_, src) in hf_dirs.items():
        ckpt, back = root / f"{family}_ckpt", root / f"{family}_back"
        assert convert_main(["import-hf", "--model", str(src), "--output", str(ckpt),
                             "--set", "parallel.tensor=2", "--set", "parallel.pipeline=2"]) == 0
        assert convert_main(["export-hf", "--checkpoint", str(ckpt), "--output", str(back), "--verify"]) == 0
        out[family] = (ckpt, back)
    return out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_tp2_pp2_equal_logits_and_weights(hf_dirs, roundtrips, family):
    from mtnlg.checkpoint import load_native_model

    model, _ = hf_dirs[family]
    ckpt, back = roundtrips[family]
    exported = load_hf(back)
    ids = sample()
    d_hf = max_logit_diff(model, exported, ids)
    native, run_cfg, _ = load_native_model(ckpt)
    d_native = max_logit_diff(model, native, ids)
    print(f"\n{family}: HF vs exported HF max|dlogit| = {d_hf:.3g}; HF vs mtnlg GPTModel = {d_native:.3g}")
    assert d_hf <= LOGIT_TOL and d_native <= LOGIT_TOL
    assert (run_cfg.parallel.tensor, run_cfg.parallel.pipeline) == (2, 2)
    a, b = model.state_dict(), exported.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact: no arithmetic on the way
    with torch.no_grad():
        logits = exported(input_ids=ids).logits
    assert logits.shape == (3, SEQ, VOCAB) and float(logits.abs().max()) > 0.5  # not a degenerate model


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_config_matches_source(hf_dirs, roundtrips, family):
    model, src = hf_dirs[family]
    _, back = roundtrips[family]
    a, b = json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    keys = {"gpt2": ["n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "layer_norm_epsilon",
                     "activation_function", "tie_word_embeddings"],
            "llama": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "max_position_embeddings", "vocab_size", "rms_norm_eps",
                      "rope_parameters", "tie_word_embeddings", "head_dim", "attention_bias", "mlp_bias"]}
    keys["qwen2"] = keys["llama"][:-3] + ["use_sliding_window"]
    keys["mistral"] = keys["llama"][:-2] + ["sliding_window"]
    keys = keys[family]
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    assert b["architectures"] == [type(model).__name__]
    assert (back / "generation_config.json").is_file()


def test_import_writes_deepspeed_file_names_for_each_layout(hf_dirs, roundtrips, tmp_path):
    from mtnlg.checkpoint import load_native_model

    model, src = hf_dirs["llama"]
    ckpt, _ = roundtrips["llama"]
    names = sorted(p.name for p in (ckpt / "global_step0").iterdir())
    layer_files = [f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(7) for t in range(2)]
    assert names == sorted(layer_files + [f"mp_rank_{m:02d}_model_states.pt" for m in range(4)]
                           + ["complete", "mtnlg_config.yaml", "weights_only"])
    assert (ckpt / "latest").read_text() == "global_step0"
    ids = sample()
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        out = tmp_path / f"l{tp}{pp}"
        assert cli("import-hf", "--model", src, "--output", out, "--set", f"parallel.tensor={tp}",
                   "--set", f"parallel.pipeline={pp}")[0] == 0
        files = {p.name for p in (out / "global_step0").glob("*.pt")}
        want = {f"mp_rank_{m:02d}_model_states.pt" for m in range(tp * pp)}
        if pp > 1:
            want |= {f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(7) for t in range(tp)}
        assert files == want
        native, _, _ = load_native_model(out)
        assert max_logit_diff(model, native, ids) <= LOGIT_TOL


@pytest.mark.parametrize("family,tied", [("gpt2", False), ("llama", True)])
def test_roundtrip_other_tying(family, tied, tmp_path):
    """An untied GPT-2 head and a tied Llama head survive tp=2, pp=2 (the pipeline's tied module)."""
    from mtnlg.checkpoint import load_native_model
    from mtnlg.convert import export_hf, import_hf

    model = hf_model(family, tie_word_embeddings=tied)
    src = save_hf(model, tmp_path / "src")
    ckpt = import_hf(src, tmp_path / "ckpt", ["parallel.tensor=2", "parallel.pipeline=2"])
    heads = sorted(p.name for p in (ckpt / "global_step0").glob("layer_06-*"))
    assert heads == ([] if tied else ["layer_06-model_00-model_states.pt", "layer_06-model_01-model_states.pt"])
    result = export_hf(ckpt, tmp_path / "back", verify=True)
    exported = load_hf(tmp_path / "back")
    native, _, _ = load_native_model(ckpt)
    ids = sample()
    d_hf, d_native = max_logit_diff(model, exported, ids), max_logit_diff(model, native, ids)
    print(f"\n{family} tied={tied}: HF vs exported HF max|dlogit| = {d_hf:.3g}; HF vs mtnlg = {d_native:.3g}")
    assert d_hf <= LOGIT_TOL and d_native <= LOGIT_TOL
    assert result.max_abs_diff <= result.tolerance
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is tied


def test_rope_needs_no_permutation(hf_dirs, roundtrips):
    """mtnlg's RoPE is HF's rotate-half: no q/k permutation, and the check would catch one."""
    from mtnlg.checkpoint import load_native_model

    model, _ = hf_dirs["llama"]
    native, _, _ = load_native_model(roundtrips["llama"][0])
    ids = sample()
    assert max_logit_diff(model, native, ids) <= LOGIT_TOL
    hd, nq, nkv = 16, 4, 2
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])  # interleaved (GPT-J) <-> rotate-half
    rows = torch.cat([h * hd + perm for h in range(nq + 2 * nkv)])
    with torch.no_grad():
        for i in range(1, 5):
            w = native.get_parameter(f"{i}.attn.qkv.weight")
            q_k = (nq + nkv) * hd
            w[:q_k] = w[rows[:q_k]].clone()
    wrong = max_logit_diff(model, native, ids)
    print(f"\nllama: a GPT-J style q/k permutation would differ by {wrong:.3g}")
    assert wrong > 100 * LOGIT_TOL


def test_export_bf16_sharded_verify(hf_dirs, roundtrips, tmp_path, capsys):
    from safetensors import safe_open

    model, _ = hf_dirs["llama"]
    ckpt, _ = roundtrips["llama"]
    out = tmp_path / "bf16"
    rc, _ = cli("export-hf", "--checkpoint", ckpt, "--output", out, "--dtype", "bf16", "--max-shard-size", "40KB",
                "--verify", capsys=capsys)
    assert rc == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).stat().st_size <= 40_000 + 4096 for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    src = model.state_dict()
    total = 0
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16 and torch.equal(t, src[k].to(torch.bfloat16))
                total += t.numel() * 2
    assert total == index["metadata"]["total_size"] and len(index["weight_map"]) == len(src)
    exported = load_hf(out)
    d = max_logit_diff(model, exported, sample())
    print(f"\nllama bf16 export vs fp32 source: max|dlogit| = {d:.3g}")
    assert 0 < d < 0.1  # bf16 rounding of the weights, nothing worse


def test_export_verify_reports_difference(roundtrips, tmp_path, capsys):
    ckpt, _ = roundtrips["gpt2"]
    rc, _ = cli("export-hf", "--checkpoint", ckpt, "--output", tmp_path / "v", "--verify", capsys=None)
    out = capsys.readouterr().out
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("export-hf: verify:"))
    diff = float(line.split("difference ")[1].split()[0])
    tol = float(line.split("tolerance ")[1].rstrip(") OK"))
    print(f"\ngpt2 --verify: max|dlogit| = {diff:.3g} (tolerance {tol:.3g})")
    assert diff <= tol <= 1e-4


def test_tokenizer_travels_both_ways(hf_dirs, roundtrips, tokenizer):
    from transformers import AutoTokenizer

    ckpt, back = roundtrips["gpt2"]
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    text = "the quick brown fox 1234"
    tok = AutoTokenizer.from_pretrained(str(back), local_files_only=True)
    assert tok.encode(text) == tokenizer.encode(text) and len(tok.encode(text)) > 3
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["eos_token_id"] == tokenizer.eod_id
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eod_id
    from mtnlg.config import load_config

    run_cfg = load_config(ckpt / "mtnlg_config.yaml")
    assert run_cfg.data.tokenizer == str((ckpt / "tokenizer").resolve())
    assert run_cfg.checkpoint.load == str(ckpt.resolve())
    assert Path(run_cfg.deepspeed_config).is_file()


def test_full_state_dict_is_unpadded_and_merged(hf_dirs, roundtrips):
    from mtnlg.checkpoint import full_state_dict

    model, _ = hf_dirs["llama"]
    sd = full_state_dict(roundtrips["llama"][0])
    assert sd["0.word_embeddings.weight"].shape == (VOCAB, 64)  # padded to 256 on disk (128 * tp)
    hf = model.state_dict()
    qkv = sd["1.attn.qkv.weight"]
    assert torch.equal(qkv, torch.cat([hf[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(sd["6.head.weight"], hf["lm_head.weight"])


# --------------------------------------------------------------------------- errors


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_error_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = cli("export-hf", "--checkpoint", tmp_path / "empty", "--output", tmp_path / "out", capsys=capsys)
    assert rc == 2 and "is not an mtnlg checkpoint" in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_error_missing_iteration(roundtrips, tmp_path, capsys):
    ckpt, _ = roundtrips["gpt2"]
    rc, err = cli("export-hf", "--checkpoint", ckpt, "--iteration", "5", "--output", tmp_path / "out", capsys=capsys)
    assert rc == 2 and "no checkpoint of iteration 5; complete iterations: 0" in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_error_unsupported_architecture(tmp_path, capsys):
    from transformers import AlbertConfig  # BERT is a family of its own now (tests/test_bert.py)

    src = tmp_path / "albert"
    AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(src)
    rc, err = cli("import-hf", "--model", src, "--output", tmp_path / "out", capsys=capsys)
    assert rc == 2 and "model_type 'albert'" in _one_line(err) and "not supported" in err
    assert not (tmp_path / "out").exists()


def test_error_shape_mismatch(hf_dirs, tmp_path, capsys):
    _, src = hf_dirs["gpt2"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_embd"] = 32  # the weights are 64 wide
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, err = cli("import-hf", "--model", bad, "--output", tmp_path / "out", capsys=capsys)
    line = _one_line(err)
    assert rc == 2 and "has shape" in line and "config.json implies" in line
    assert not (tmp_path / "out").exists()


def test_error_pickle_only(hf_dirs, tmp_path, capsys):
    model, src = hf_dirs["gpt2"]
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    shutil.copy(src / "config.json", pkl / "config.json")
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    rc, err = cli("import-hf", "--model", pkl, "--output", tmp_path / "out", capsys=capsys)
    line = _one_line(err)
    assert rc == 2 and "pytorch_model.bin" in line and "safetensors only" in line
    assert not (tmp_path / "out").exists()


def test_error_existing_output_and_bad_layout(hf_dirs, roundtrips, tmp_path, capsys):
    _, src = hf_dirs["llama"]
    ckpt, back = roundtrips["llama"]
    before = sorted(p.name for p in back.iterdir())
    rc, err = cli("export-hf", "--checkpoint", ckpt, "--output", back, capsys=capsys)
    assert rc == 2 and "--overwrite" in _one_line(err)
    assert sorted(p.name for p in back.iterdir()) == before
    rc, err = cli("import-hf", "--model", src, "--output", tmp_path / "o", "--set", "parallel.tensor=3", capsys=capsys)
    assert rc == 2 and "not divisible by parallel.tensor = 3" in _one_line(err)
    assert not (tmp_path / "o").exists()


def test_python_module_entry_point(tmp_path):
    """``python -m mtnlg`` works and a user error is one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "mtnlg", "export-hf", "--checkpoint",
                        str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("mtnlg export-hf: error: checkpoint directory")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("knobs,cls", [
    ({"architecture": "gpt2"}, "GPT2LMHeadModel"),
    ({"architecture": "gpt2", "tie_embeddings": False}, "GPT2LMHeadModel"),
    ({"architecture": "llama"}, "LlamaForCausalLM"),
    ({"architecture": "llama", "qkv_bias": True}, "Qwen2ForCausalLM"),  # the class that has exactly that
    ({"architecture": "llama", "bias": True}, "LlamaForCausalLM"),  # attention_bias + mlp_bias
    ({"architecture": "qwen2"}, "Qwen2ForCausalLM"),
    ({"architecture": "qwen2", "qkv_bias": False}, "LlamaForCausalLM"),
    ({"architecture": "mistral"}, "MistralForCausalLM"),
    ({"architecture": "gpt2", "norm": "rmsnorm"}, "model.norm = rmsnorm (GPT2LMHeadModel has layernorm)"),
    ({"architecture": "gpt2", "num_kv_heads": 2}, "model.num_kv_heads = 2 (GPT2LMHeadModel has one key/value"),
    ({"architecture": "llama", "position_embedding": "learned"}, "model.position_embedding = learned"),
])
def test_export_picks_the_exact_hf_class_or_names_the_knob(knobs, cls):
    from mtnlg.config import load_config, resolve
    from mtnlg.convert.keymaps import hf_class
    from mtnlg.errors import UserError

    overrides = ["model.vocab_size=100", "model.hidden_size=64", "model.num_attention_heads=4"]
    cfg = resolve(load_config(None, overrides + [f"model.{k}={v}" for k, v in knobs.items()]), 1).model
    if cls.endswith("ForCausalLM") or cls.endswith("HeadModel"):
        assert hf_class(cfg) == cls
    else:
        with pytest.raises(UserError) as err:
            hf_class(cfg)
        assert cls in str(err.value) and "no Hugging Face equivalent" in str(err.value)
        assert "\n" not in str(err.value)
