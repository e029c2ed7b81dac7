"""T5 generation and sequence-to-sequence fine-tuning, end to end.

- ``mtnlg generate`` on T5 checkpoints: a random original T5 (ReLU, tied output layer) imported from Hugging Face,
  and a v1.1 T5 fine-tuned here; batched prompts of different lengths; token for token what transformers'
  ``generate`` gives on the exported directory (``mtnlg generate --hf`` and transformers called directly); the
  cached decoder's logits (self-attention KV cache, cross-attention K/V computed once) equal to a full decoder pass
  over the same tokens.
- Fine-tuning on ``preprocess --sft`` data (the prompt to the encoder, the response as the decoder's target) in
  one 2-rank launch at tp = 2: the loss falls, and the same launch generates at tp = 2 what one process generates
  from the merged checkpoint: each training prompt's response. The batches hold the prompt (tokenized from the
  raw rows) in the encoder and the response as the only labels, and the loss is the cross-entropy of exactly the
  response tokens.
- Bad input: responses longer than the decoder, one line.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from tests.dist_helper import ds_config, run_distributed

ROWS = [  # prompt -> response; short, so a tiny model learns them in a few dozen steps
    ("the capital of france?", " paris"), ("the capital of italy?", " rome"), ("two plus two?", " four"),
    ("the color of the sky?", " blue"), ("the opposite of hot?", " cold"), ("a baby cat is a?", " kitten"),
    ("the first letter?", " a b c"), ("the color of grass?", " green"),
]
EXTRA_IDS = 8  # the tokenizer's sentinels (T5's tokenizers need them; fine-tuning does not use them)
MODEL = {"architecture": "t5", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 4,
         "ffn_hidden_size": 128, "seq_length": 16, "decoder_seq_length": 8, "norm_eps": 1e-6,
         "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16, "vocab_extra_ids": EXTRA_IDS,
         "hidden_dropout": 0.0, "attention_dropout": 0.0}
ITERS = 60
LOGIT_TOL = 1e-5  # relative to the largest logit


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from mtnlg.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("t5tok")
    train_tokenizer([p + r for p, r in ROWS] * 4, 300, root / "tok", vocab_extra_ids=EXTRA_IDS)
    return root / "tok"


def cli(*args: str) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of ``mtnlg ARGS`` in this process."""
    from mtnlg.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, [line for line in out.getvalue().splitlines() if line.strip()], err.getvalue()


def generated(lines: list[str]) -> list[tuple[str, int]]:
    return [(r["completion"], r["tokens"]) for r in map(json.loads, lines)]


def check_cache_against_full_pass(module, prompts: list[list[int]], eod: int, pad: int) -> float:
    """Greedy decoding through ``generate`` with the logits of each step recorded, then one full decoder pass over
    [start, generated tokens]: the largest logit difference relative to the largest logit."""
    from mtnlg.eval.seq2seq import encoder_input

    rows = [encoder_input(p, eod) for p in prompts]
    width = max(len(r) for r in rows)
    enc = torch.full((len(rows), width), pad)
    padding = torch.zeros_like(enc)
    for b, r in enumerate(rows):
        enc[b, : len(r)], padding[b, : len(r)] = torch.tensor(r), 1
    steps = []

    def pick(logits):
        steps.append(logits.clone())
        return logits.argmax(-1)

    with torch.no_grad():
        out = module.generate(enc, padding, max_new_tokens=6, start_id=pad, pick=pick)
        dec = torch.cat([torch.full((len(rows), 1), pad), out[:, :-1]], dim=1)
        full = module((enc, padding, dec, torch.ones_like(dec)))
    cached = torch.stack(steps, dim=1)
    return float((cached - full).abs().max() / full.abs().max())


def test_generate_original_t5_equals_transformers(tmp_path, tok_dir):
    """A random original T5 (ReLU, tied output layer scaled by d_model^-0.5) imported from HF: `mtnlg generate`
    on the checkpoint, on its `export-hf` directory and transformers' own `generate` (with its cache: as many
    decoder blocks as encoder blocks) give the same tokens for a batch of prompts of different lengths."""
    import transformers

    from mtnlg.checkpoint import load_native_model
    from mtnlg.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(3)
    cfg = transformers.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                num_decoder_layers=2, num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True,
                                dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                pad_token_id=tok.pad_id, eos_token_id=tok.eod_id, decoder_start_token_id=tok.pad_id)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # 10x the projections, else every input decodes to one repeated token
        for name, p in hf.named_parameters():
            if "shared" not in name and "relative" not in name and "layer_norm" not in name:
                p.mul_(10.0)
    hf.save_pretrained(str(tmp_path / "hf"))
    tok.hf.save_pretrained(str(tmp_path / "hf"))
    assert cli("import-hf", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"))[0] == 0
    prompts = ["the capital of france?", "two?", "a baby cat is a kitten or a dog?"]
    args = [a for p in prompts for a in ("--prompt", p)] + ["--max-new-tokens", "8", "--device", "cpu"]
    code, native, err = cli("generate", "--checkpoint", str(tmp_path / "ckpt"), *args)
    assert code == 0, err
    assert cli("export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "back"))[0] == 0
    code, exported, err = cli("generate", "--hf", str(tmp_path / "back"), *args)
    assert code == 0, err
    want = []
    for p in prompts:  # transformers directly, on the exported directory, with its own KV cache
        back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "back")).eval()
        enc = torch.tensor([tok.encode(p) + [tok.eod_id]])
        ids = back.generate(input_ids=enc, max_new_tokens=8, do_sample=False, num_beams=1)[0, 1:].tolist()
        want.append((tok.decode([t for t in ids if t not in (tok.eod_id, tok.pad_id)]), len(ids)))
    print(f"\noriginal T5: {generated(native)}")
    assert generated(native) == generated(exported) == want
    assert len({c for c, _ in want}) == len(want)  # each prompt decodes to its own tokens
    module, _, _ = load_native_model(tmp_path / "ckpt")
    diff = check_cache_against_full_pass(module.eval(), [tok.encode(p) for p in prompts], tok.eod_id, tok.pad_id)
    print(f"original T5: cached vs full decoder pass, max |dlogit| / max |logit| = {diff:.1e}")
    assert diff <= LOGIT_TOL


# --------------------------------------------------------------------------- fine-tuning


def sft_config(prefix: str, tok: str, save: str, tp: int, iters: int = ITERS, **model) -> dict:
    return {
        "model": {**MODEL, **model}, "parallel": {"tensor": tp},
        "train": {"iters": iters, "micro_batch_size": 8, "global_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_iters": 5, "log_interval": 10, "seed": 5, "peak_tflops": 1.0},
        "data": {"sft": {"prefix": prefix}, "tokenizer": tok, "split": "100,0,0"},
        "checkpoint": {"save": save, "load": None, "interval": 0},
        "deepspeed_config": ds_config(1),
    }


def train_and_generate(rank: int, world: int, cfg: dict, prompts: list[str]) -> dict:
    """Fine-tune (this launch's layout), then generate greedily at tp = world from the saved checkpoint."""
    from mtnlg.config import from_dict
    from mtnlg.eval.loading import open_model
    from mtnlg.training.loop import train

    summary = train(from_dict(cfg))
    gen = open_model(checkpoint=cfg["checkpoint"]["save"], device="cpu", for_generation=True).generator
    return {"losses": summary.losses, "ids": gen.generate_ids([gen.encode(p) for p in prompts], 8)}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tok_dir) -> dict:
    from mtnlg.data.sft import preprocess_sft
    from mtnlg.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("t5sft")
    (root / "sft.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS))
    preprocess_sft([root / "sft.jsonl"], load_tokenizer(tok_dir), root / "sft", log=lambda _m: None)
    cfg = sft_config(str(root / "sft"), str(tok_dir), str(root / "ckpt"), tp=2)
    (result,) = {json.dumps(r) for r in run_distributed(train_and_generate, 2, args=(cfg, [p for p, _ in ROWS]))}
    return {"root": root, "cfg": cfg, **json.loads(result)}


def test_finetuned_t5_answers_its_prompts(finetuned):
    """Fine-tuned at tp = 2: the loss falls; `mtnlg generate` (one process, the merged checkpoint) answers each
    training prompt with its response, the tokens the tp = 2 launch generated; the export gives them too."""
    losses = {int(k): v for k, v in finetuned["losses"].items()}
    first, last = losses[1], losses[ITERS]
    print(f"\nT5 fine-tuning (tp=2): loss {first:.3f} -> {last:.3f} in {ITERS} steps")
    assert last < 0.1 * first
    root = finetuned["root"]
    args = [a for p, _ in ROWS for a in ("--prompt", p)] + ["--max-new-tokens", "8", "--device", "cpu"]
    code, lines, err = cli("generate", "--checkpoint", str(root / "ckpt"), *args)
    assert code == 0, err
    got = generated(lines)
    assert [c for c, _ in got] == [r for _, r in ROWS], got
    assert [n for _, n in got] == [len(ids) for ids in finetuned["ids"]]  # each answer and its EOD
    assert cli("export-hf", "--checkpoint", str(root / "ckpt"), "--output", str(root / "hf"))[0] == 0
    code, hf_lines, err = cli("generate", "--hf", str(root / "hf"), *args)
    assert code == 0, err
    assert generated(hf_lines) == got


def test_finetuned_tp2_tokens_and_cache(finetuned):
    """The tp = 2 launch's tokens equal one process's; the cached decoder's logits equal a full decoder pass."""
    from mtnlg.checkpoint import load_native_model
    from mtnlg.eval.loading import open_model

    root = finetuned["root"]
    gen = open_model(checkpoint=str(root / "ckpt"), device="cpu", for_generation=True).generator
    prompts = [gen.encode(p) for p, _ in ROWS]
    assert gen.generate_ids(prompts, 8) == finetuned["ids"]
    module, _, _ = load_native_model(root / "ckpt")
    diff = check_cache_against_full_pass(module.eval(), prompts, gen.eod_id, gen.start_id)
    print(f"\nfine-tuned T5: cached vs full decoder pass, max |dlogit| / max |logit| = {diff:.1e}")
    assert diff <= LOGIT_TOL


def test_sft_batches_mask_the_prompt(finetuned, tok_dir):
    """The family's batches of the run: the encoder holds the prompt (tokenized from the raw rows) and EOD, the
    labels are the response and EOD, nothing else; the model's loss is the mean cross-entropy of exactly those
    response tokens (computed here from the full logits and the raw rows' spans)."""
    from mtnlg.checkpoint import load_native_model
    from mtnlg.config import from_dict, resolve
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.model.registry import family
    from mtnlg.training.sources import data_tokenizer, with_vocab

    cfg = from_dict({**finetuned["cfg"], "parallel": {"tensor": 1}})
    cfg = resolve(with_vocab(cfg, data_tokenizer(cfg)), 1)
    fam = family(cfg.model)
    train, _ = fam.sources(cfg)
    tok = load_tokenizer(tok_dir)
    (enc, enc_pad, dec, dec_pad), labels = fam.collate([train[i] for i in range(8)])
    spans = []
    for i in range(8):
        prompt, response = ROWS[train.example(i)]
        p, r = tok.encode(prompt) + [tok.eod_id], tok.encode(response) + [tok.eod_id]
        assert enc[i, : len(p)].tolist() == p and enc_pad[i].sum() == len(p)
        assert labels[i, : len(r)].tolist() == r and (labels[i, len(r):] == -1).all()
        assert dec[i, 0] == tok.pad_id and dec[i, 1 : len(r)].tolist() == r[:-1]
        spans.append(len(r))
    module, _, _ = load_native_model(finetuned["root"] / "ckpt")
    with torch.no_grad():
        logits = module.eval()((enc, enc_pad, dec, dec_pad))
        loss = module((enc, enc_pad, dec, dec_pad), labels)
    logp = logits.float().log_softmax(-1)
    want = torch.cat([-logp[i, torch.arange(n), torch.tensor(tok.encode(ROWS[train.example(i)][1]) + [tok.eod_id])]
                      for i, n in enumerate(spans)]).mean()
    print(f"\nT5 SFT loss {float(loss):.6f}, cross-entropy of the response tokens {float(want):.6f}")
    assert abs(float(loss) - float(want)) <= 1e-5 * max(1.0, float(want))


def test_response_longer_than_the_decoder_is_one_line(finetuned, tok_dir):
    """An SFT file whose response does not fit decoder_seq_length: one line naming the length that fits."""
    from mtnlg.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    longest = max(len(tok.encode(r)) + 1 for _, r in ROWS)  # a response and its EOD
    root = Path(finetuned["root"])
    bad = json.loads(json.dumps(finetuned["cfg"]))
    bad["model"]["decoder_seq_length"] = longest - 1
    bad["parallel"]["tensor"] = 1
    bad["checkpoint"]["save"] = str(root / "bad")
    (root / "bad.yaml").write_text(json.dumps(bad))
    code, _, err = cli("train", "--config", str(root / "bad.yaml"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert f"longer than the decoder's {longest - 1} tokens" in lines[0], lines[0]
    assert f"model.decoder_seq_length: {longest}" in lines[0], lines[0]
    assert not (root / "bad").exists()
