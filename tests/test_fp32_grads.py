"""bf16 training's gradient paths: the token lookup's gradient goes straight into the optimizer's fp32
buffer (no dense bf16 embedding gradient), and DeepSpeed's immediate fp32 accumulation is on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_helper import run_distributed
from tests.helpers import run_config


def test_lookup_adds_row_gradients_into_the_fp32_buffer():
    from mtnlg.parallel import Init, VocabParallelEmbedding

    emb = VocabParallelEmbedding(40, 48, 16, tp_group=None, init=Init(1, 0.02), name="e").to(torch.bfloat16)
    ids = torch.tensor([[3, 7, 3, 0], [39, 7, 7, 12]])  # repeated ids: their rows' gradients add up
    grad_out = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    reference = emb.weight.detach().float().requires_grad_()
    F.embedding(ids, reference).backward(grad_out.float())

    buffer = torch.full((48, 16), 0.5)  # already holds earlier micro batches' gradients
    emb.fp32_grad = lambda: buffer
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, F.embedding(ids, emb.weight.detach()))
    out.backward(grad_out)
    assert emb.weight.grad is None  # no dense bf16 gradient was made
    torch.testing.assert_close(buffer - 0.5, reference.grad, rtol=0, atol=1e-6)

    with torch.no_grad():  # evaluation does not touch the buffer
        emb(ids)
    emb.fp32_grad = None
    emb(ids).backward(grad_out)  # the dense path when nothing is routed
    # bf16 rounding: a row's gradient sums its ids' bf16 gradients in bf16 (id 7 three times): a few ulp of 2^-8
    torch.testing.assert_close(emb.weight.grad.float(), reference.grad, rtol=2e-2, atol=4e-3)


def _routed_vs_dense(rank: int, world: int, preset: str, tp: int, pp: int) -> dict:
    from mtnlg.bench.setups import synthetic_batches
    from mtnlg.config import resolve
    from mtnlg.parallel import ParallelState, VocabParallelEmbedding
    from mtnlg.training.engine import Engine

    out = {}
    for routed in (True, False):
        cfg = resolve(run_config(preset, tp=tp, pp=pp, precision="bf16"), world)
        ps = ParallelState.create(tp, pp)
        engine = Engine(cfg, ps, torch.device("cpu"))
        embeddings = [m for m in engine.module.modules() if isinstance(m, VocabParallelEmbedding)]
        out.setdefault("routed_modules", sum(m.fp32_grad is not None for m in embeddings))
        if not routed:
            for m in embeddings:
                m.fp32_grad = None
        batches = synthetic_batches(cfg, seed=11 + ps.dp_rank)
        steps = []
        for i in range(3):
            engine.rng.seed_iteration(i + 1)
            r = engine.train_step(batches)
            steps.append((r.loss, r.grad_norm))
        out[routed] = steps
        out["immediate"] = engine.ds_config["bf16"]["immediate_grad_update"]
        if pp > 1 and ps.pp_rank == pp - 1:  # no micro batch's logits outlive its backward (deepspeed_compat)
            out["stale_outputs"] = sum(o is not None for o in engine.engine.pipe_buffers["outputs"])
    return out


@pytest.mark.parametrize("preset,tp,pp", [("gpt2", 1, 1), ("gpt2", 1, 2), ("llama", 2, 1)])
def test_bf16_routed_embedding_gradient_matches_the_dense_path(preset, tp, pp):
    """Two ranks: tied gpt2 with dp = 2 (one weight gets the lookup's gradient routed and the output
    layer's dense one), tied gpt2 across two pipeline stages (the first stage's copy gets only the routed
    gradient, which must still be all-reduced with the last stage's), untied llama with tp = 2."""
    results = run_distributed(_routed_vs_dense, 2, args=(preset, tp, pp))
    for r in results:
        assert r["immediate"] is True
        on, off = r[True], r[False]
        for (loss_on, norm_on), (loss_off, norm_off) in zip(on, off):
            assert abs(loss_on - loss_off) <= 2e-3 * abs(loss_off), (on, off)
            assert abs(norm_on - norm_off) <= 1e-2 * abs(norm_off), (on, off)
        assert on[-1][0] < on[0][0]  # it is learning
    first_stage = results[0]
    assert first_stage["routed_modules"] == 1
    if pp > 1:
        assert results[-1]["stale_outputs"] == 0
