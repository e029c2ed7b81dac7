"""The shared transformer block's slots: self-attention masks as a choice (causal, bidirectional, narrowed by
packed documents and padding), the optional cross-attention sub-layer, and pre/post norm; each against a
reference written out longhand, and tp = 2 (with and without sequence parallelism, under selective and full
recompute) against tp = 1, forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtnlg.config import ModelConfig, RunConfig, resolve
from mtnlg.model.blocks import TransformerBlock
from mtnlg.parallel import Init, ParallelState, TPRandom
from tests.dist_helper import run_distributed

H, HEADS, T, S = 32, 4, 8, 6


def cfg_for(tp: int = 1, **kw) -> ModelConfig:
    raw = RunConfig(model=ModelConfig(architecture="gpt2", num_layers=2, hidden_size=H, num_attention_heads=HEADS,
                                      vocab_size=64, seq_length=T, **kw))
    raw.parallel.tensor = tp
    return resolve(raw, world_size=tp).model


def block_for(cfg: ModelConfig, ps: ParallelState | None = None, **kw) -> TransformerBlock:
    ps = ps or ParallelState.single()
    return TransformerBlock(cfg, ps, TPRandom(7, ps.tp_rank), Init(11, cfg.init_std), 0, **kw)


def longhand_attention(xq, xkv, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, allowed):
    """softmax(q k^T / sqrt(d)) v over the allowed (B, T, S) pairs, head by head, then the output projection."""
    B, Tq, C = xq.shape
    hd = C // HEADS
    q = (xq @ w_q.T + b_q).view(B, Tq, HEADS, hd)
    k = (xkv @ w_k.T + b_k).view(B, -1, HEADS, hd)
    v = (xkv @ w_v.T + b_v).view(B, -1, HEADS, hd)
    y = torch.zeros(B, Tq, HEADS, hd)
    for h in range(HEADS):
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h]) / math.sqrt(hd)
        y[:, :, h] = torch.einsum("bts,bsd->btd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v[:, :, h])
    return y.reshape(B, Tq, C) @ w_o.T + b_o


def longhand_block(block: TransformerBlock, x, causal, segments, padding, context, context_padding, pre):
    """The block's forward written out: masks built pair by pair, residuals normed before or after."""
    B = x.size(0)
    allowed = torch.ones(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                ok = (not causal or j <= i) and (segments is None or segments[b, i] == segments[b, j])
                ok = ok and (padding is None or bool(padding[b, j]))
                allowed[b, i, j] = ok
            if not allowed[b, i].any():
                allowed[b, i, i] = True

    def split(w, n):
        return w.detach().split(n, dim=0)

    a = block.attn
    wq, wk, wv = split(a.qkv.weight, [H, H, H])
    bq, bk, bv = split(a.qkv.bias, [H, H, H])
    self_attn = lambda h: longhand_attention(h, h, wq, bq, wk, bk, wv, bv, a.proj.weight.detach(),  # noqa: E731
                                             a.proj.bias.detach(), allowed)
    subs = [(block.norm1, self_attn)]
    if context is not None:
        c = block.cross_attn
        cwk, cwv = split(c.kv.weight, [H, H])
        cbk, cbv = split(c.kv.bias, [H, H])
        cross_allowed = torch.ones(B, T, S, dtype=torch.bool) if context_padding is None else \
            context_padding[:, None, :].expand(B, T, S).bool()
        subs.append((block.cross_norm, lambda h: longhand_attention(
            h, context, c.q.weight.detach(), c.q.bias.detach(), cwk, cbk, cwv, cbv, c.proj.weight.detach(),
            c.proj.bias.detach(), cross_allowed)))
    fc, proj = block.mlp.fc, block.mlp.proj
    subs.append((block.norm2, lambda h: F.gelu(h @ fc.weight.detach().T + fc.bias.detach(), approximate="tanh")
                 @ proj.weight.detach().T + proj.bias.detach()))
    for norm, f in subs:
        n = lambda t, m=norm: F.layer_norm(t, (H,), m.weight.detach(), m.bias.detach(), m.eps)  # noqa: E731
        x = x + f(n(x)) if pre else n(x + f(x))
    return x


CASES = {  # name: (mask, segments?, padding?, cross?, context padding?, norm position)
    "causal": ("causal", False, False, False, False, "pre"),
    "causal+documents+padding": ("causal", True, True, False, False, "pre"),
    "bidirectional": ("bidirectional", False, False, False, False, "pre"),
    "bidirectional+padding, post-norm": ("bidirectional", False, True, False, False, "post"),
    "bidirectional+documents": ("bidirectional", True, False, False, False, "pre"),
    "decoder with cross-attention": ("causal", False, True, True, True, "pre"),
    "post-norm decoder, cross-attention, no padding": ("causal", False, False, True, False, "post"),
}


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, H, generator=g)
    context = torch.randn(2, S, H, generator=g)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    padding = torch.tensor([[1] * T, [1] * 5 + [0] * 3], dtype=torch.bool)
    context_padding = torch.tensor([[1] * S, [1] * 4 + [0] * 2], dtype=torch.bool)
    return x, context, segments, padding, context_padding


def carried(case: tuple, segments, padding, context, context_padding) -> tuple[tuple, tuple]:
    """(the carries names, the tensors) a block of ``case`` takes beside x."""
    mask, seg, pad, cross, cpad, _ = case
    names, values = [], []
    for name, on, value in [("segments", seg, segments), ("padding", pad, padding), ("context", cross, context),
                            ("context_padding", cpad, context_padding)]:
        if on:
            names.append(name)
            values.append(value)
    return tuple(names), tuple(values)


@pytest.mark.parametrize("name", list(CASES))
def test_block_matches_longhand(name):
    mask, seg, pad, cross, cpad, position = case = CASES[name]
    x, context, segments, padding, context_padding = inputs()
    names, values = carried(case, segments, padding, context, context_padding)
    block = block_for(cfg_for(norm_position=position), mask=mask, cross_attention=cross, carries=names).eval()
    got = block((x, *values))[0] if names else block(x)
    ref = longhand_block(block, x, mask == "causal", segments if seg else None, padding if pad else None,
                         context if cross else None, context_padding if cpad else None, position == "pre")
    assert (got - ref).abs().max().item() < 1e-5, name


def test_masks_decide_what_a_token_sees():
    """Perturbing the last token changes the first token's output exactly when attention is bidirectional; padded
    keys and padded context tokens change nothing a real token computes."""
    x, context, _, padding, context_padding = inputs()
    causal = block_for(cfg_for(), mask="causal").eval()
    bidir = block_for(cfg_for(), mask="bidirectional", carries=("padding",)).eval()
    x2 = x.clone()
    x2[:, -1] += torch.randn(H)  # not a constant: LayerNorm would remove it
    assert torch.equal(causal(x)[:, 0], causal(x2)[:, 0])
    ones = torch.ones_like(padding)
    assert (bidir((x, ones))[0][:, 0] - bidir((x2, ones))[0][:, 0]).abs().max() > 1e-3
    # row 1 pads its last 3 tokens: its real tokens (0..4) do not see them
    assert torch.allclose(bidir((x, padding))[0][1, :5], bidir((x2, padding))[0][1, :5], atol=1e-6)
    dec = block_for(cfg_for(), mask="causal", cross_attention=True,
                    carries=("context", "context_padding")).eval()
    c2 = context.clone()
    c2[1, 4:] += torch.randn(2, H)  # padded context tokens of row 1
    c2[0, 0] += torch.randn(H)  # a real context token of row 0
    a, b = dec((x, context, context_padding))[0], dec((x, c2, context_padding))[0]
    assert torch.allclose(a[1], b[1], atol=1e-6) and (a[0] - b[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------- tp = 2 vs tp = 1


def _full_grads(block: TransformerBlock, ps: ParallelState) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    from mtnlg.parallel.layers import merge_shards

    out = {}
    for name, p in block.named_parameters():
        g = p.grad
        if ps.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(ps.tp_size)]
            dist.all_gather(parts, g.contiguous(), group=ps.tp_group)
            g = merge_shards(parts, p.sharding.dim, p.sharding.blocks)
        out[name] = g
    return out


def _tp_blocks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from mtnlg.parallel.layers import sum_replicated_grads

    out = {}
    x, context, _, padding, context_padding = inputs(3)
    names = ("padding", "context", "context_padding")
    for sp in (False, True):
        ps = ParallelState.create(tp=world, sequence_parallel=sp)
        for recompute in ("none", "selective", "full"):
            results = []
            for tp_ps, cfg in [(ParallelState.single(), cfg_for(1, norm_position="post", recompute=recompute,
                                                                  hidden_dropout=0.0)),
                               (ps, cfg_for(world, norm_position="post", recompute=recompute))]:
                block = block_for(cfg, tp_ps, mask="bidirectional", cross_attention=True, carries=names).train()
                if tp_ps.sequence_parallel:
                    sum_replicated_grads(block, tp_ps.tp_group)
                shard = tp_ps.sequence_parallel
                xs = x.chunk(world, dim=1)[rank] if shard else x
                cs = context.chunk(world, dim=1)[rank] if shard else context
                xs, cs = xs.clone().requires_grad_(), cs.clone().requires_grad_()
                if recompute == "full":
                    y = block.attn.rng.checkpoint(block.forward_args, xs, padding, cs, context_padding)[0]
                else:
                    y = block((xs, padding, cs, context_padding))[0]
                w = torch.randn(2, T, H, generator=torch.Generator().manual_seed(5))  # a loss that weighs every output
                (y * (w.chunk(world, dim=1)[rank] if shard else w)).sum().backward()
                if shard:  # gather the sequence shards back
                    parts = [torch.empty_like(t) for t in (y, xs.grad, cs.grad) for _ in range(world)]
                    full = []
                    for i, t in enumerate((y.detach(), xs.grad, cs.grad)):
                        chunk = parts[i * world:(i + 1) * world]
                        dist.all_gather(chunk, t.contiguous(), group=tp_ps.tp_group)
                        full.append(torch.cat(chunk, dim=1))
                    y_full, gx, gc = full
                else:
                    y_full, gx, gc = y.detach(), xs.grad, cs.grad
                results.append((y_full, gx, gc, _full_grads(block, tp_ps)))
            (y1, gx1, gc1, g1), (y2, gx2, gc2, g2) = results
            out[(sp, recompute)] = {
                "out": (y1 - y2).abs().max().item(), "grad_x": (gx1 - gx2).abs().max().item(),
                "grad_context": (gc1 - gc2).abs().max().item(), "names": sorted(g1) == sorted(g2),
                "grads": max((g1[n] - g2[n]).abs().max().item() for n in g1),
                "context_grad_size": gc1.abs().max().item(),
            }
    return out


@pytest.fixture(scope="module")
def tp_blocks():
    return run_distributed(_tp_blocks, 2)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2+SP"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_encoder_decoder_block_tp2_matches_tp1(tp_blocks, sp, recompute):
    """A post-norm block with bidirectional, padded self-attention and cross-attention over a padded context:
    output, input and context gradients and every parameter's gradient equal at tp = 1 and tp = 2."""
    for r in tp_blocks:
        res = r[(sp, recompute)]
        assert res["names"]
        assert res["context_grad_size"] > 1e-3  # the context really gets a gradient (small weights: ~0.01)
        for key in ("out", "grad_x", "grad_context", "grads"):
            assert res[key] < 1e-5, (key, res)
