"""The speed paths: chunked vocab-parallel cross entropy (vs F.cross_entropy, fp32 and bf16, padding,
ignore_index, several chunks, tp=2) and FLOP-balanced pipeline stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_helper import run_distributed


def _case(dtype, vocab=50, padded=64, rows=(3, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*rows, padded, generator=gen) * 4).to(dtype)
    logits[..., vocab:] = 0  # padding rows of the embedding are zero, so are their logits
    target = torch.randint(0, vocab, rows, generator=gen)
    target[0, :3] = -100
    weight = torch.rand(rows, generator=gen)  # a non-uniform upstream gradient
    return logits, target, weight


def _reference(logits, target, weight, vocab):
    x = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(x[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none")
    (loss * weight.reshape(-1)).sum().backward()
    return loss.reshape(target.shape), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 64])  # one chunk, or 1 row per chunk
def test_chunked_ce_matches_torch(monkeypatch, dtype, chunk):
    from mtnlg.parallel import cross_entropy as ce

    if chunk:
        monkeypatch.setattr(ce, "CHUNK_ELEMENTS_CPU", chunk)
    vocab = 50
    logits, target, weight = _case(dtype, vocab)
    ref_loss, ref_grad = _reference(logits, target, weight, vocab)
    x = logits.clone().requires_grad_()
    loss = ce.vocab_parallel_cross_entropy(x, target, None, vocab)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert loss[0, :3].abs().max().item() == 0.0  # ignored tokens
    (loss * weight).sum().backward()
    assert x.grad.dtype == dtype
    assert x.grad[..., vocab:].abs().max().item() == 0.0  # padding columns
    assert x.grad[0, :3].abs().max().item() == 0.0  # ignored rows
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:  # the fp32 gradient rounded once to bf16
        torch.testing.assert_close(x.grad.float(), ref_grad.to(dtype).float(), rtol=1e-2, atol=1e-6)


def test_chunked_ce_keeps_no_fp32_copy_of_the_logits():
    """Forward saves the logits themselves (bf16), not an fp32 softmax of them."""
    from mtnlg.parallel.cross_entropy import vocab_parallel_cross_entropy

    logits, target, _ = _case(torch.bfloat16, rows=(4, 32), padded=512, vocab=500)
    x = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        vocab_parallel_cross_entropy(x, target, None, 500)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big)


def _tp_ce(rank: int, world: int) -> dict[str, float]:
    from mtnlg.parallel import ParallelState
    from mtnlg.parallel import cross_entropy as ce

    ce.CHUNK_ELEMENTS_CPU = 40  # several chunks per rank
    ps = ParallelState.create(tp=world)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        vocab = 45  # rank 1 holds 13 real columns and 19 of padding (64 / 2 = 32 per rank)
        logits, target, weight = _case(dtype, vocab, padded=64)
        ref_loss, ref_grad = _reference(logits, target, weight, vocab)
        x = logits.chunk(world, -1)[rank].clone().requires_grad_()
        loss = ce.vocab_parallel_cross_entropy(x, target, ps.tp_group, vocab)
        (loss * weight).sum().backward()
        mine = ref_grad.chunk(world, -1)[rank].to(dtype).float()  # the reference, rounded as ours is
        out[f"{name}_loss"] = (loss - ref_loss).abs().max().item()
        out[f"{name}_grad"] = ((x.grad.float() - mine).abs() / (mine.abs() + 1e-3)).max().item()
        out[f"{name}_pad"] = x.grad[..., vocab - 32:].abs().max().item() if rank == 1 else 0.0
    return out


def test_chunked_ce_tp2_matches_torch():
    for r in run_distributed(_tp_ce, 2):
        assert r["fp32_loss"] < 1e-5 and r["bf16_loss"] < 1e-5, r
        assert r["fp32_grad"] < 1e-4 and r["bf16_grad"] < 1e-2, r
        assert r["fp32_pad"] == 0.0 and r["bf16_pad"] == 0.0, r


def test_pipeline_stages_balance_flops():
    from mtnlg.config import from_dict, resolve
    from mtnlg.model.layout import block_anchors, spec_flops, stage_bounds
    from mtnlg.parallel.pipeline import balanced_parts

    cfg = resolve(from_dict({"model": {"architecture": "gpt2", "num_layers": 12, "hidden_size": 768,
                                       "num_attention_heads": 12, "vocab_size": 50257, "seq_length": 512}}), 2).model
    w = spec_flops(cfg)  # read off the parameters: the tied head is the embedding's [V, h] matrix again
    assert len(w) == 12 + 3 and w[0] == 0 and w[-1] == 2 * 768 * 50257
    assert w[1] == 2 * 12 * 768**2 + 4 * 512 * 768  # a block: its four matrices (qkv, proj, fc, proj) + attention
    assert block_anchors(cfg) == [False] + [True] * 12 + [False, False]
    # the LM head is ~4.9 blocks of work: 8 blocks on stage 0, 4 blocks + head on stage 1
    assert balanced_parts(w, 2) == stage_bounds(cfg, 2) == [0, 9, 15]
    assert balanced_parts([1, 1, 1, 1], 4) == [0, 1, 2, 3, 4]
    assert balanced_parts([1.0] * 5, 2) == [0, 3, 5]  # ties: more work early
    assert balanced_parts([0, 1, 1, 0, 5], 3) == [0, 2, 4, 5]
    with pytest.raises(ValueError):
        balanced_parts([1, 1], 3)
    # every stage keeps a transformer block: no stage of only the final norm or only the head
    assert balanced_parts([0, 1, 1, 0, 9], 2, [False, True, True, False, False]) == [0, 2, 5]


@pytest.mark.parametrize("kv_heads,seq", [(4, 48), (2, 48), (2, 512)])
def test_unfused_cpu_bf16_attention_matches_fp32_sdpa(kv_heads, seq):
    """The bf16 CPU attention path (two GEMMs around a softmax with an additive causal bias) against
    fp32 SDPA, forward and backward, with and without GQA: within bf16 rounding."""
    from mtnlg.model.blocks import unfused_causal_attention, use_unfused_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, seq, 16, generator=gen) for h in (4, kv_heads, kv_heads))
    g = torch.randn(2, 4, seq, 16, generator=gen)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=kv_heads != 4)
    ref.backward(g)
    low_in = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    assert use_unfused_attention(low_in[0]) and not use_unfused_attention(q)
    out = unfused_causal_attention(*low_in)
    out.backward(g.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.03
    for a, b in zip(low_in, ref_in):
        assert (a.grad.float() - b.grad).abs().max() < 0.05 * b.grad.abs().max()
