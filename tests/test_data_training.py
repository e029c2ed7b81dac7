"""Training from preprocessed Megatron data through the 3D layout; the data position under any dp size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtnlg.config import from_dict, resolve
from tests.dist_helper import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def _make_data(directory: Path) -> tuple[str, str]:
    """A tiny corpus -> tokenizer (vocab 300) -> PREFIX.bin/.idx."""
    from mtnlg.data.preprocess import preprocess
    from mtnlg.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "tensor", "pipeline", "data", "parallel", "model", "token"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 80)))) for _ in range(200)]
    jsonl = directory / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer(docs, vocab_size=300, output_dir=directory / "tok")
    preprocess([str(jsonl)], "text", tok, str(directory / "corpus"), workers=1, log=lambda *_: None)
    return str(directory / "corpus"), str(directory / "tok")


def _train_3d(rank, world, prefix, tok, save):
    from mtnlg.training.loop import train

    cfg = from_dict({
        "model": {"architecture": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "num_kv_heads": 2, "seq_length": 32},
        "parallel": {"tensor": 2, "pipeline": 2},
        "train": {"iters": 4, "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "log_interval": 1,
                  "eval_interval": 2, "eval_iters": 1, "precision": "bf16", "peak_tflops": 1.0},
        "data": {"prefix": prefix, "tokenizer": tok, "split": "90,10,0"},
        "checkpoint": {"save": save},
        "deepspeed_config": str(ROOT / "ds_configs" / "zero1.json"),
    })
    summary = train(cfg)
    return {"losses": summary.losses, "val": summary.val_losses}


def test_train_from_preprocessed_prefix_in_3d(tmp_path):
    prefix, tok = _make_data(tmp_path)
    save = tmp_path / "ckpt"
    res = run_distributed(_train_3d, 8, args=(prefix, tok, str(save)))[0]
    assert sorted(res["losses"]) == [1, 2, 3, 4] and sorted(res["val"]) == [2, 4]
    assert res["losses"][4] < res["losses"][1]
    from mtnlg.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tok).vocab_size
    assert res["losses"][1] < np.log(vocab) + 0.5  # a real start, near uniform over the vocabulary
    cfg_text = (save / "global_step4" / "mtnlg_config.yaml").read_text()
    assert f"vocab_size: {vocab}\n" in cfg_text  # taken from the tokenizer
    assert load_tokenizer(str(save / "tokenizer")).vocab_size == vocab  # saved beside the checkpoint


def test_data_position_is_independent_of_dp():
    """Every iteration reads the same global samples, whatever the dp size (so resume under any dp is exact)."""
    from mtnlg.training.loop import micro_batches

    class Source:
        def __getitem__(self, i):
            return np.full(5, i)

    read = {}
    for dp in (1, 2, 4):
        cfg = resolve(from_dict({"model": {"vocab_size": 10, "seq_length": 4, "num_layers": 1, "hidden_size": 8,
                                            "num_attention_heads": 1},
                                  "train": {"micro_batch_size": 2, "global_batch_size": 8}}), dp)
        for start in (0, 8, 24):
            samples = []
            for d in range(dp):
                ps = type("PS", (), {"dp_size": dp, "dp_rank": d})()
                for ids, _ in micro_batches(Source(), start, cfg, ps, "cpu"):
                    samples += ids[:, 0].tolist()
            read[(dp, start)] = sorted(samples)
    for start in (0, 8, 24):
        assert read[(1, start)] == read[(2, start)] == read[(4, start)] == list(range(start, start + 8))


def test_prefetched_batches_are_the_synchronous_ones_and_errors_reach_the_loop():
    """The loader builds each iteration's micro batches ahead on a thread: the same tensors, in order, and a failure
    in the source is raised in the training thread."""
    import pytest
    import torch

    from mtnlg.training.loop import Prefetcher, micro_batches

    class Source:
        def __getitem__(self, i):
            if i >= 36:
                raise IndexError(f"sample {i} out of range")
            return np.arange(i, i + 5)

    cfg = resolve(from_dict({"model": {"vocab_size": 100, "seq_length": 4, "num_layers": 1, "hidden_size": 8,
                                        "num_attention_heads": 1},
                              "train": {"micro_batch_size": 2, "global_batch_size": 8}}), 2)
    ps = type("PS", (), {"dp_size": 2, "dp_rank": 1})()
    loader = Prefetcher(Source(), cfg, ps, "cpu", first=3, last=5, consumed=16)
    try:
        for it in (3, 4):
            got, want = loader.next(), micro_batches(Source(), 16 + 8 * (it - 3), cfg, ps, "cpu")
            assert len(got) == len(want) == 2
            assert all(torch.equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w))
        with pytest.raises(IndexError, match="sample 38"):
            loader.next()  # iteration 5: this dp rank reads samples 34, 35, 38, 39
    finally:
        loader.close()
