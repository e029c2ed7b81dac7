"""Every parameter kind has exactly the universal-checkpoint rule its sharding calls for."""

from __future__ import annotations

import re

import pytest

from mtnlg.checkpoint.universal import universal_checkpoint_info
from mtnlg.model import GPTModel

CASES = {
    "gpt2-tied": {"architecture": "gpt2"},
    "gpt2-untied": {"architecture": "gpt2", "tie_embeddings": False},
    "llama-gqa": {"architecture": "llama", "num_kv_heads": 2},
    "llama-tied-mqa": {"architecture": "llama", "num_kv_heads": 1, "tie_embeddings": True},
}


def _rules(info: dict, name: str) -> list[str]:
    kinds = {
        "replicated": info["tp_replicated_parameter_patterns"],
        "row": info["parameter_with_row_parallelism_patterns"],
        "vocab": info["vocabulary_parameter_patterns"],
        "sub": [p for s in info["parameter_with_sub_params"] for p in s["patterns"]],
    }
    return [k for k, pats in kinds.items() if any(re.match(p, name) for p in pats)]


@pytest.mark.parametrize("case", list(CASES))
def test_every_parameter_has_the_rule_its_sharding_needs(case):
    """Each parameter is matched by exactly the DeepSpeed rule its sharding calls for (patterns generalise layer
    numbers; none may catch a parameter of another kind), and DeepSpeed's strict mode finds a use for every pattern."""
    model = GPTModel.from_config({"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4,
                                  "vocab_size": 100, "seq_length": 8, **CASES[case]})
    cfg = model.cfg
    info = universal_checkpoint_info(cfg, tp=1)
    assert info["original_vocab_size"] == 100
    for name, p in model.named_parameters():
        rules, sh = _rules(info, name), p.sharding
        if sh.kind == "column" and sh.blocks:  # fused q, k, v / gate, up: each block merged on its own
            assert rules == ["sub"], name
            entry = next(e for e in info["parameter_with_sub_params"] if any(re.match(q, name) for q in e["patterns"]))
            assert entry["shape"][0] == sh.blocks and entry["partition_dim"] == 0
        elif sh.kind == "column":  # plain column-parallel: DeepSpeed's default concatenation on dim 0 is right
            assert rules == [], name
        else:
            assert rules == [sh.kind], name
        assert getattr(p, "tensor_model_parallel", False) == (sh.kind != "replicated")  # DeepSpeed's norm code
    all_names = [n for n, _ in model.named_parameters()]
    for key in ("tp_replicated_parameter_patterns", "parameter_with_row_parallelism_patterns",
                "vocabulary_parameter_patterns", "pipeline_replicated_parameter_patterns"):
        for pat in info.get(key, []):
            assert any(re.match(pat, n) for n in all_names), (key, pat)
    assert ("pipeline_replicated_parameter_patterns" in info) == cfg.tie_embeddings


def test_shard_widths_follow_tp():
    model = GPTModel.from_config({"architecture": "llama", "num_layers": 1, "hidden_size": 64, "num_attention_heads": 8,
                                  "num_kv_heads": 2, "vocab_size": 100, "seq_length": 8})
    info = universal_checkpoint_info(model.cfg, tp=2)
    widths = info["sub_param_shard_widths"]
    qkv = next(w for p, w in widths.items() if "qkv" in p)
    assert qkv == [[32, 32], [8, 8], [8, 8]]  # q = 8 heads x 8, kv = 2 heads x 8, split over 2 ranks
    fc = next(w for p, w in widths.items() if "fc" in p)
    assert fc == [[model.cfg.ffn_hidden_size // 2] * 2] * 2  # gate, up
