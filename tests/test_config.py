"""The run config: strict loading, overrides, derived values, and one clear line per mistake."""

from __future__ import annotations

import pytest

from mtnlg.config import ConfigError, load_config, parse_split, resolve, save_config

GOOD = """
model: {architecture: llama, num_layers: 4, hidden_size: 64, num_attention_heads: 8, num_kv_heads: 4,
        vocab_size: 1000, seq_length: 32}
parallel: {tensor: 2, pipeline: 2}
train: {iters: 10, micro_batch_size: 2, global_batch_size: 16, lr: 3e-4}
"""


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_good_config_resolves(tmp_path):
    cfg = resolve(load_config(write(tmp_path, GOOD)), world_size=8)
    assert cfg.parallel.data == 2
    assert cfg.train.grad_accum_steps == 4  # 16 / (2 * 2)
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.model.padded_vocab_size == 1024  # multiple of 128 * tp=2
    assert cfg.model.ffn_hidden_size == 192  # 8*64/3 rounded up to 64
    assert cfg.model.tie_embeddings is False
    assert cfg.train.lr_decay_iters == 10


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.iters=50", "model.architecture=gpt2", "model.num_kv_heads=null",
                                              "checkpoint.save=/tmp/x", "data.blend=[{prefix: a, weight: 2}]"])
    assert cfg.train.iters == 50 and cfg.model.architecture == "gpt2" and cfg.checkpoint.save == "/tmp/x"
    assert cfg.data.blend[0].prefix == "a" and cfg.data.blend[0].weight == 2.0
    resolved = resolve(cfg, 4)
    assert resolved.model.tie_embeddings is True and resolved.model.num_kv_heads == 8
    save_config(resolved, tmp_path / "out.yaml")
    again = resolve(load_config(tmp_path / "out.yaml"), 4)
    assert again == resolved  # derived values written out agree with themselves


def test_padded_vocab_follows_tp():
    for tp, padded in [(1, 50304), (2, 50432), (4, 50688), (8, 51200)]:
        cfg = load_config(None, ["model.vocab_size=50257", f"parallel.tensor={tp}", "model.num_attention_heads=16",
                                 "model.hidden_size=1024"])
        assert resolve(cfg, tp).model.padded_vocab_size == padded


BAD = [
    # (yaml text or overrides, world size, substring expected in the one-line message)
    ("model: {hiden_size: 64}", 1, "unknown key 'model.hiden_size'; valid keys in model: architecture"),
    ("modle: {}", 1, "unknown key 'modle'"),
    ("model: {architecture: gpt3}", 1, "model.architecture = 'gpt3' is not one of: gpt2, llama, mistral, qwen2"),
    ("model: {architecture: llama, preset: gpt2}", 1, "model.preset = gpt2 and model.architecture = llama disagree"),
    ("model: {norm: batchnorm}", 1, "model.norm = 'batchnorm' is not one of: layernorm, rmsnorm"),
    ("model: {num_layers: two}", 1, "model.num_layers must be int, got 'two'"),
    ("train: {lr: fast}", 1, "train.lr must be float, got 'fast'"),
    ("model: [1, 2]", 1, "model must be a mapping"),
    ("model: {num_layers: 3}\nparallel: {pipeline: 4}", 4,
     "model.num_layers = 3 is less than parallel.pipeline = 4"),
    ("train: {lr: .nan}", 1, "train.lr = nan must be a finite number"),
    ("train: {lr: nan}", 1, "train.lr = 'nan' must be a finite number"),
    ("train: {clip_grad: .inf}", 1, "train.clip_grad = inf must be a finite number"),
    ("train: {exit_interval: -1}", 1, "train.exit_interval and train.exit_duration_mins must be >= 0"),
    ("parallel: {tensor: 2, pipeline: 2}", 6,
     "world size 6 is not divisible by parallel.tensor * parallel.pipeline = 4"),
    ("model: {num_attention_heads: 12, hidden_size: 768}\nparallel: {tensor: 8}", 8,
     "model.num_attention_heads = 12 is not divisible by parallel.tensor = 8"),
    ("model: {architecture: llama, num_attention_heads: 8, hidden_size: 64, num_kv_heads: 1}\nparallel: {tensor: 2}", 2,
     "model.num_kv_heads = 1 is not divisible by parallel.tensor = 2"),
    ("model: {architecture: llama, num_attention_heads: 8, hidden_size: 64, num_kv_heads: 3}", 1,
     "model.num_kv_heads = 3 must divide model.num_attention_heads = 8"),
    ("model: {hidden_size: 100, num_attention_heads: 12}", 1, "model.hidden_size = 100 is not divisible by"),
    ("train: {micro_batch_size: 4, global_batch_size: 10}", 2,
     "train.global_batch_size = 10 is not a multiple of micro_batch_size 4 * data-parallel size 2 = 8"),
    ("train: {micro_batch_size: 2, global_batch_size: 16, grad_accum_steps: 3}", 2,
     "train.grad_accum_steps = 3 but global_batch_size 16"),
    ("parallel: {data: 3}", 2, "parallel.data = 3 but world size 2"),
    ("model: {seq_length: 2048, max_position_embeddings: 1024}", 1, "model.seq_length = 2048 exceeds"),
    ("train: {lr: 1.0e-4, min_lr: 1.0e-3}", 1, "need 0 <= train.min_lr"),
    ("train: {iters: 10, warmup_iters: 20}", 1, "train.warmup_iters = 20 must be between 0 and lr_decay_iters = 10"),
    ("data: {prefix: a, synthetic: {}}", 1, "give one of prefix, blend, synthetic or sft, not prefix and synthetic"),
    ("data: {split: 'a,b'}", 1, "data.split = 'a,b' must be up to three non-negative numbers"),
    ("data: {merge_file: vocab.bpe}", 1, "data.merge_file needs data.vocab_file"),
    ("model: {hidden_dropout: 1.5}", 1, "model.hidden_dropout = 1.5 must be in [0, 1)"),
    ("model: {num_layers: 0}", 1, "model.num_layers = 0 must be a positive integer"),
    ("checkpoint: {keep_last: 0}", 1, "checkpoint.keep_last = 0 must be >= 1"),
    ("model: {padded_vocab_size: 1000}", 1, "model.padded_vocab_size = 1000 but vocab 50257"),
    ("model: {tie_embeddings: maybe}", 1, "model.tie_embeddings must be bool, got 'maybe'"),
    ("train: {precision: fp8}", 1, "train.precision = 'fp8' is not one of: fp32, bf16, fp16"),
    ("model: {num_layers: 2\n", 1, "malformed YAML"),
    ("- just a list", 1, "a run config must be a YAML mapping"),
    ("model: {vocab_size: null}", 1, "model.vocab_size is not set and the data has no tokenizer"),
]


def _with_vocab(text: str) -> str:
    """Give the model a vocabulary unless the case is about it (or has no model mapping)."""
    about_vocab = "vocab_size" in text.replace("padded_vocab_size", "")
    if about_vocab or "model: [" in text or text.startswith("-") or text.endswith("\n"):
        return text
    if text.startswith("model: {"):
        return text.replace("model: {", "model: {vocab_size: 50257, ", 1)
    return text + "\nmodel: {vocab_size: 50257}"


@pytest.mark.parametrize("text,world,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_config_gives_one_clear_line(tmp_path, text, world, message):
    text = _with_vocab(text)
    with pytest.raises(ConfigError) as err:
        resolve(load_config(write(tmp_path, text)), world)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.iters"])
    with pytest.raises(ConfigError, match="'train' is a value, not a section"):
        load_config(None, ["train=3", "train.iters=4"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("arch,knobs", [
    ("gpt2", ("layernorm", "gelu", "learned", True, True, True, 10000.0, 256)),
    ("llama", ("rmsnorm", "swiglu", "rope", False, False, False, 10000.0, 192)),
    ("mistral", ("rmsnorm", "swiglu", "rope", False, False, False, 10000.0, 192)),
    ("qwen2", ("rmsnorm", "swiglu", "rope", False, True, False, 1e6, 192)),
])
def test_architecture_names_defaults_every_knob_overrides(arch, knobs):
    """model.architecture sets norm, activation, positions, biases, tying, rope theta (and the ffn default)."""
    base = ["model.vocab_size=100", "model.hidden_size=64", "model.num_attention_heads=4", f"model.architecture={arch}"]
    m = resolve(load_config(None, base), 1).model
    names = ("norm", "activation", "position_embedding", "bias", "qkv_bias", "tie_embeddings", "rope_theta",
             "ffn_hidden_size")
    assert tuple(getattr(m, k) for k in names) == knobs
    m = resolve(load_config(None, [*base, "model.norm=layernorm", "model.qkv_bias=true", "model.bias=false",
                                   "model.tie_embeddings=true"]), 1).model
    assert (m.norm, m.qkv_bias, m.bias, m.tie_embeddings, m.architecture) == ("layernorm", True, False, True, arch)


def test_preset_is_a_deprecated_alias(tmp_path, capsys):
    cfg = resolve(load_config(write(tmp_path, "model: {preset: llama, vocab_size: 100}")), 1)
    assert cfg.model.architecture == "llama" and cfg.model.preset is None and cfg.model.norm == "rmsnorm"
    err = capsys.readouterr().err
    assert "model.preset is deprecated" in err and "model.architecture: llama" in err


def test_stages_need_not_hold_equal_layer_counts():
    """Pipeline stages are balanced by FLOPs, so 3 layers on 2 stages is a valid layout."""
    cfg = resolve(load_config(None, ["model.vocab_size=50257", "model.num_layers=3", "parallel.pipeline=2"]), 2)
    assert cfg.parallel.pipeline == 2


def test_parse_split():
    assert parse_split("98,1,1") == pytest.approx((0.98, 0.01, 0.01))
    assert parse_split("969, 30, 1") == pytest.approx((0.969, 0.030, 0.001))
    assert parse_split("1") == (1.0, 0.0, 0.0)
