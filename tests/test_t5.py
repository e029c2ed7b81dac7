"""T5 (``model.architecture: t5``): Hugging Face T5ForConditionalGeneration round trips (v1.1 and the original)
through a tp = 2 x pp = 2 checkpoint, greedy generation equal to transformers', layouts against (1, 1, 1) in real
DeepSpeed training (losses, gradient norms, every parameter's first-step gradient; the pipeline with the encoder's
output carried through the decoder's stages; sequence parallelism with the encoder's output carried as sequence
shards), and the bad input of a pipeline split without a pipeline or of a decoder length SP cannot split."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.helpers import RTOL, STEPS, max_rel, run_config, sgd_update, train_many, update_rel_diff

T5 = {"architecture": "t5", "num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_kv_heads": 4,
      "ffn_hidden_size": 48, "vocab_size": 96, "seq_length": 16, "norm_eps": 1e-6,
      "relative_attention_num_buckets": 8, "relative_attention_max_distance": 12,
      "decoder_seq_length": 16}  # the synthetic copy task: the decoder writes the whole window again
SPLIT = {**T5, "encoder_pipeline_stages": 1}  # (1, 2, 1): the encoder on stage 0, the decoder on stage 1
# sequence parallelism: a decoder shorter than the encoder (8 and 16 tokens), the encoder's output carried as
# sequence shards from the encoder's stage to the decoder's
SHORT = {**T5, "decoder_seq_length": 8}
SP_SPLIT = {**SHORT, "encoder_pipeline_stages": 1}
# world -> (tp, pp, zero, model[, sequence parallel]): the layouts compared with (1, 1, 1) of the same lengths
LAYOUTS = {1: [(1, 1, 1, T5), (1, 1, 1, SHORT)], 2: [(2, 1, 1, T5), (1, 2, 1, SPLIT), (1, 1, 3, T5)],
           4: [(1, 4, 1, T5), (2, 2, 1, SP_SPLIT, True)], 8: [(2, 2, 1, T5)]}
LOGIT_TOL = 1e-5  # relative to the largest logit
# the SGD step of the gradient comparison: 10x tests/helpers.py's, so that the float32 rounding of a norm weight at
# 1.0 (1.2e-7) is 1e-6 of its small update, not 1e-5 (measured at 100: 1.0e-5 on an encoder norm at tp = 2)
SGD_LR = 1000.0


def _hf_t5(tied: bool, d_kv: int = 8):
    """A tiny random T5ForConditionalGeneration: v1.1 (gated-GELU, an output layer of its own) or the original
    (ReLU, tied and scaled; its projections 10x transformers' init, else every input decodes to one repeated
    token); 2 encoder and 3 decoder blocks; random norm weights; 4 heads of ``d_kv`` (8: d_model / heads; T5-11B's
    heads are wider than that)."""
    import transformers

    torch.manual_seed(5 + tied)
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=d_kv, d_ff=48, num_layers=2, num_decoder_layers=3,
                                num_heads=4, feed_forward_proj="relu" if tied else "gated-gelu",
                                tie_word_embeddings=tied, dropout_rate=0.0, relative_attention_num_buckets=8,
                                relative_attention_max_distance=12)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
            elif tied and "shared" not in name and "relative" not in name:
                p.mul_(10.0)
        if not tied:  # transformers 5 ties T5's lm_head unless it is a tensor of its own
            model.lm_head.weight = torch.nn.Parameter(torch.randn(96, 32) * 0.5)
    return model


@pytest.mark.parametrize("tied, d_kv", [(False, 8), (True, 8), (False, 16)], ids=["v1.1", "original", "v1.1-d_kv"])
def test_hf_roundtrip_through_tp2_pp2(tmp_path, tied, d_kv):
    """HF -> import-hf (tp 2, pp 2) -> export-hf --verify -> HF: the same logits (<= 1e-5 of the largest) from
    mtnlg's model and from the exported directory, the same weights bit for bit. ``d_kv``: 16 is 4 heads x 16 = 64
    over d_model 32 (``model.kv_channels``, as T5-11B's 128 x 128 over 1024)."""
    import transformers

    from mtnlg.checkpoint import load_native_model
    from mtnlg.cli import main as convert_main
    from mtnlg.convert.hf import t5 as adapter

    hf = _hf_t5(tied, d_kv)
    hf.save_pretrained(str(tmp_path / "hf"))
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert convert_main(["import-hf", "--model", str(tmp_path / "hf"), "--output", str(ckpt), "--set",
                         "parallel.tensor=2", "--set", "parallel.pipeline=2", "--set", "model.seq_length=24"]) == 0
    assert convert_main(["export-hf", "--checkpoint", str(ckpt), "--output", str(back), "--verify"]) == 0
    native, run_cfg, _ = load_native_model(ckpt)
    assert (run_cfg.parallel.tensor, run_cfg.parallel.pipeline) == (2, 2)
    assert run_cfg.model.family_knobs.tie_word_embeddings is tied
    assert run_cfg.model.head_dim == d_kv and run_cfg.model.kv_channels == (d_kv if d_kv != 8 else None)
    exported = transformers.T5ForConditionalGeneration.from_pretrained(str(back), local_files_only=True).eval()
    ours = adapter.verify_inputs(run_cfg.model)
    assert ours[1].min() == 0  # a padded encoder row
    with torch.no_grad():
        (ref,), (got_back,) = adapter.hf_outputs(hf, ours), adapter.hf_outputs(exported, ours)
        got_native = native(ours)
    scale = float(ref.abs().max())
    d_native, d_back = float((got_native - ref).abs().max()) / scale, float((got_back - ref).abs().max()) / scale
    print(f"\nT5 {'original' if tied else 'v1.1'}: max |dlogit| / max |logit| ({scale:.1f}): mtnlg {d_native:.1e}, "
          f"exported HF {d_back:.1e}")
    assert d_native <= LOGIT_TOL and d_back <= LOGIT_TOL
    a, b = hf.state_dict(), exported.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert exported.config.scale_decoder_outputs is tied
    # greedy generation: mtnlg's (encoder once, decoder with a KV cache and cached cross-attention) token for token
    # transformers' generate on the export (its cache assumes as many decoder blocks as encoder blocks: off)
    enc, enc_padding = ours[0][:, :12], ours[1][:, :12]
    n = 10
    want = exported.generate(input_ids=enc, attention_mask=enc_padding, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, num_beams=1, decoder_start_token_id=0, use_cache=False)[:, 1:]
    got = native.generate(enc, enc_padding, max_new_tokens=n)
    assert torch.equal(got, want), (got, want)
    assert len({tuple(row) for row in want.tolist()}) == len(want)  # each input decodes to its own tokens


def train_recording_blocks(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """``train_many`` of each run, each result with the shapes this rank's T5 blocks received: ("encoder", x) and
    ("decoder", y, the carried encoder output), as they travel between blocks (and pipeline stages)."""
    from mtnlg.model import t5

    plain, seen = t5.T5Block.forward, set()

    def forward(self, x, kv=None):
        hidden, *rest = x
        carried = dict(zip(self.carries, [None, *rest] if self.first else rest))  # the first adds the bias
        seen.add(("decoder", tuple(hidden.shape), tuple(carried["context"].shape)) if self.decoder
                 else ("encoder", tuple(hidden.shape)))
        return plain(self, x, kv)

    t5.T5Block.forward = forward
    try:
        out = []
        for run in runs:
            seen.clear()
            out.append({**train_many(rank, world, [run])[0], "blocks": sorted(seen)})
        return out
    finally:
        t5.T5Block.forward = plain


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """(tp, pp, dp, zero, decoder length, sp) -> {"adamw": result, "sgd": saved one-step SGD result} for every
    layout of LAYOUTS."""
    root = tmp_path_factory.mktemp("t5parity")
    out = {}
    for world, layouts in LAYOUTS.items():
        runs, keys = [], []
        for tp, pp, zero, model, *sp in layouts:
            sp = bool(sp and sp[0])
            key = (tp, pp, world // (tp * pp), zero, model["decoder_seq_length"], sp)
            common = {"architecture": "t5", "tp": tp, "pp": pp, "zero": zero, "model": model, "sp": sp}
            save = str(root / "-".join(map(str, ("sgd", *key))))
            runs += [common, {**common, "sgd": True, "lr": SGD_LR, "save": save}]
            keys += [(key, "adamw"), (key, "sgd")]
        results = run_distributed(train_recording_blocks, world, args=(runs,))
        for r in results[1:]:  # every rank reports the same (dp-averaged, pipeline-broadcast) losses and norms
            for a, b in zip(r, results[0]):
                assert a["losses"] == b["losses"] and a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-12)
        for i, ((key, kind), run) in enumerate(zip(keys, runs)):
            blocks = sorted({seen for r in results for seen in r[i]["blocks"]})  # every stage's blocks
            out.setdefault(key, {})[kind] = {**results[0][i], "blocks": blocks, "save": run.get("save")}
    return out


def _compare(parity, key: tuple, model: dict) -> tuple[dict, dict, float]:
    base, got = parity[(1, 1, 1, 1, *key[4:5], False)], parity[key]
    loss = max_rel(got["adamw"]["losses"], base["adamw"]["losses"])
    norm = max_rel(got["adamw"]["grad_norms"], base["adamw"]["grad_norms"])
    grads = update_rel_diff(sgd_update(got["sgd"]["save"], "t5", model), sgd_update(base["sgd"]["save"], "t5", model))
    print(f"\nT5 tp,pp,dp,zero={key[:4]} decoder {key[4]} SP {key[5]} vs (1,1,1): losses {loss:.1e}, grad norms "
          f"{norm:.1e}, first-step gradients {grads:.1e} (max relative)")
    assert loss < RTOL and norm < RTOL and grads < RTOL
    return base, got, grads


@pytest.mark.parametrize("tp,pp,dp,zero", [(2, 1, 1, 1), (1, 2, 1, 1), (1, 4, 1, 1), (2, 2, 2, 1), (1, 1, 2, 3)])
def test_layout_parity(parity, tp, pp, dp, zero):
    """Every layout trains T5 as (1, 1, 1) does: losses and gradient norms of 5 AdamW steps, every parameter's
    first SGD step, within 1e-5."""
    base, got, _ = _compare(parity, (tp, pp, dp, zero, T5["decoder_seq_length"], False), T5)
    losses = base["adamw"]["losses"]
    assert losses[STEPS] < losses[1] - 0.05  # it is learning (the copy task of synthetic data)
    if zero == 3:
        split, total = got["adamw"]["zero3"]
        assert split == total > 10


def test_sequence_parallel_parity(parity):
    """tp 2 x pp 2 with sequence parallelism trains T5 as (1, 1, 1) does (losses, gradient norms, every parameter's
    first SGD step within 1e-5), an encoder of 16 tokens and a decoder of 8; between blocks and pipeline stages the
    hidden states and the carried encoder output are sequence shards (half of each length)."""
    base, got, _ = _compare(parity, (2, 2, 1, 1, 8, True), SHORT)
    assert base["adamw"]["losses"][STEPS] < base["adamw"]["losses"][1] - 0.05
    b, h = 2, T5["hidden_size"]
    assert got["adamw"]["blocks"] == [("decoder", (b, 4, h), (b, 8, h)), ("encoder", (b, 8, h))]
    assert base["adamw"]["blocks"] == [("decoder", (b, 8, h), (b, 16, h)), ("encoder", (b, 16, h))]


def test_sequence_parallel_needs_a_divisible_decoder_length():
    """A decoder length tp does not divide: one line naming both."""
    from mtnlg.config import ConfigError, resolve

    with pytest.raises(ConfigError) as e:
        resolve(run_config("t5", tp=2, sp=True, model={**T5, "decoder_seq_length": 7}), 2)
    assert "model.decoder_seq_length = 7" in str(e.value) and "parallel.tensor = 2" in str(e.value)
    assert "\n" not in str(e.value)


def test_pipeline_stages_split_the_stacks():
    """Balanced by FLOPs across both stacks (the decoder's cross-attention and output layer weigh more), or split
    between them where ``encoder_pipeline_stages`` says."""
    from mtnlg.config import resolve
    from mtnlg.model.layout import stage_bounds
    from mtnlg.model.t5 import encoder_spec_count

    def bounds(model: dict, pp: int) -> list[int]:
        return stage_bounds(resolve(run_config("t5", pp=pp, model=model), pp).model, pp)

    enc_end = encoder_spec_count(resolve(run_config("t5", model=T5), 1).model)  # embedding, 2 blocks, norm: 4
    assert bounds(SPLIT, 2) == [0, enc_end, 9]
    four = bounds(T5, 4)  # one block a stage: two stages inside each stack
    assert four == [0, 2, 5, 6, 9], four


def test_pipeline_split_needs_a_pipeline(tmp_path):
    """model.encoder_pipeline_stages with parallel.pipeline = 1: one line, exit 1."""
    from mtnlg.cli import main

    cfg = tmp_path / "t5.yaml"
    cfg.write_text("model: {architecture: t5, num_layers: 4, hidden_size: 32, num_attention_heads: 4, "
                   "vocab_size: 96, seq_length: 16, encoder_pipeline_stages: 1}\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["model-info", "--config", str(cfg)])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err.getvalue()
    assert "model.encoder_pipeline_stages = 1" in lines[0] and "parallel.pipeline >= 2" in lines[0]
