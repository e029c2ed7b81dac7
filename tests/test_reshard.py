"""Changing the layout on resume: `mtnlg checkpoint reshard` (DeepSpeed's universal checkpoint)
and training at another (tp, pp, dp) or ZeRO stage continues the loss curve, optimizer included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_helper import run_distributed
from tests.helpers import run_config

BIN = Path(sys.executable).parent
N = 3  # resharded at iteration N, resumed to 2N


def _train(rank, world, preset, tp, pp, zero, save, load, eval_every, vocab=None):
    from mtnlg.training.loop import train

    cfg = run_config(preset, tp=tp, pp=pp, zero=zero, iters=2 * N, save=save, load=load, eval_interval=eval_every,
                     eval_iters=2, lr_decay_iters=2 * N, model={"vocab_size": vocab} if vocab else None)
    cfg.checkpoint.interval = N
    summary = train(cfg)
    return {"losses": summary.losses, "val": summary.val_losses, "zero3": summary.zero3_partitioned}


CASES = {  # name -> preset, (world, tp, pp, zero) before, (world, tp, pp, zero) after, vocab
    "222-to-111": ("gpt2", (8, 2, 2, 1), (1, 1, 1, 1), None),
    "111-to-222": ("llama", (1, 1, 1, 1), (8, 2, 2, 1), None),
    "212-to-122": ("qwen2", (4, 2, 1, 1), (4, 1, 2, 1), None),  # q, k, v biases: fused sub-blocks, merged per block
    # DeepSpeed's ZeRO-3 universal loader cannot re-pad a vocabulary: use one that needs no padding
    "zero1-to-zero3": ("gpt2", (2, 1, 1, 1), (2, 1, 1, 3), 128),
    # BERT (masked pairs, the MLM decoder tied to the embedding across the two stages) from tp 2 x pp 2 to one rank
    "bert-221-to-111": ("megatron_bert", (4, 2, 2, 1), (1, 1, 1, 1), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_another_layout_continues_the_curve(tmp_path, case):
    preset, (w1, tp1, pp1, z1), (w2, tp2, pp2, z2), vocab = CASES[case]
    src, uni = tmp_path / "src", tmp_path / "universal"
    before = run_distributed(_train, w1, args=(preset, tp1, pp1, z1, str(src), None, N, vocab))[0]
    proc = subprocess.run([str(BIN / "mtnlg"), "checkpoint", "reshard", "--checkpoint", str(src), "--iteration",
                           str(N), "--output", str(uni)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = run_distributed(_train, w2, args=(preset, tp2, pp2, z2, str(tmp_path / "dst"), str(uni), N, vocab))[0]
    # the loaded model scores the validation batches as the saved one did ...
    assert after["val"][N] == pytest.approx(before["val"][N], rel=1e-5)
    # ... and training continues as if nothing had happened (an optimizer reset would show here)
    assert sorted(after["losses"]) == list(range(N + 1, 2 * N + 1))
    for i in range(N + 1, 2 * N + 1):
        assert after["losses"][i] == pytest.approx(before["losses"][i], rel=1e-5), i
    if z2 == 3:  # the ZeRO-3 target really partitions every parameter
        assert after["zero3"][0] == after["zero3"][1]
    worst = max(abs(after["losses"][i] / before["losses"][i] - 1) for i in after["losses"])
    print(f"{case}: val {before['val'][N]:.6f} -> {after['val'][N]:.6f}; max rel diff of resumed losses {worst:.2e}")


def test_layout_change_without_reshard_is_refused(tmp_path):
    src = tmp_path / "src"
    run_distributed(_train, 1, args=("gpt2", 1, 1, 1, str(src), None, 0))
    with pytest.raises(RuntimeError, match="was saved with tensor=1, pipeline=1, data=1, ZeRO-1 but this run is "
                                           "tensor=1, pipeline=1, data=2, ZeRO-1; convert it first"):
        run_distributed(_train, 2, args=("gpt2", 1, 1, 1, str(tmp_path / "dst"), str(src), 0))
    proc = subprocess.run([str(BIN / "mtnlg"), "checkpoint", "reshard", "--checkpoint", str(tmp_path / "none"),
                           "--output", str(tmp_path / "u")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "checkpoint directory" in proc.stderr and "not found" in proc.stderr
