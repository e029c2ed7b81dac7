"""The model-family registry: a declared family's architectures, knob defaults, own keys and checks reach the run
config; its implementation is found by name; the GPT family answers every question the trainer asks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mtnlg import families
from mtnlg.config import ConfigError, from_dict, resolve, to_dict
from mtnlg.model.registry import family, is_block


@dataclasses.dataclass(frozen=True)
class ToyKnobs:
    binary_head: bool = True
    heads_scale: float = 1.0


def _toy_check(m, par):
    if m.family_knobs.heads_scale <= 0:
        raise ConfigError(f"model.heads_scale = {m.family_knobs.heads_scale} must be positive")


@pytest.fixture
def toy_family(monkeypatch):
    """A second family, declared as a new one would be: its own architecture, knob defaults, keys and a check
    (implemented by the GPT module, which is all this test needs)."""
    toy = families.Declaration("toy", {"toy": {"norm": "rmsnorm", "activation": "gelu", "position_embedding": "rope",
                                               "bias": False, "tie_embeddings": True, "rope_theta": 500.0}},
                               "mtnlg.model.gpt", (_toy_check,), ToyKnobs)
    monkeypatch.setattr(families, "REGISTERED", (*families.REGISTERED, toy))
    return toy


def test_a_declared_family_reaches_the_config(toy_family):
    cfg = resolve(from_dict({"model": {"architecture": "toy", "vocab_size": 50, "binary_head": False}}), 1)
    m = cfg.model
    assert (m.norm, m.rope_theta, m.tie_embeddings) == ("rmsnorm", 500.0, True)  # its defaults
    assert m.family_knobs == ToyKnobs(binary_head=False, heads_scale=1.0)  # its own keys, the rest defaulted
    flat = to_dict(cfg)["model"]
    assert flat["binary_head"] is False and "family_knobs" not in flat  # written back as the YAML states them
    assert resolve(from_dict({"model": flat}), 1).model == m  # and read back the same
    assert resolve(from_dict({"model": dataclasses.asdict(m)}), 1).model == m  # so is a dataclass dump
    with pytest.raises(ConfigError, match="model.heads_scale = -1.0 must be positive"):  # its check runs
        resolve(from_dict({"model": {"architecture": "toy", "vocab_size": 50, "heads_scale": -1}}), 1)
    with pytest.raises(ConfigError, match="unknown key 'model.binary_head'"):  # another family has no such key
        from_dict({"model": {"architecture": "llama", "binary_head": False}})
    with pytest.raises(ConfigError, match="model.binary_head must be bool"):  # typed like every key
        from_dict({"model": {"architecture": "toy", "binary_head": "yes"}})
    assert "toy" in families.architectures()


def test_gpt_family_answers_the_trainer():
    cfg = resolve(from_dict({"model": {"architecture": "gpt2", "num_layers": 2, "hidden_size": 32,
                                       "num_attention_heads": 4, "vocab_size": 64, "seq_length": 8}}), 1).model
    fam = family(cfg)
    assert fam is family("llama") and fam.name == "gpt"
    samples = torch.arange(18).view(2, 9)
    inputs, labels = fam.micro_batch(samples)  # the next-token shift is the family's
    assert torch.equal(inputs, samples[:, :-1]) and torch.equal(labels, samples[:, 1:])
    model = fam.model(cfg)
    assert [is_block(f) for f in model.spec_modules()] == [False, True, True, False, False]
    assert fam.tied_weight_names(cfg) == ["tied_modules.embed.word_embeddings.weight"]
    assert len(fam.token_lookups(model)) == 1
    loss = fam.loss(cfg, model.ps)(model.hidden_and_logits(inputs), labels)
    assert torch.allclose(loss, model(inputs, labels=labels))
