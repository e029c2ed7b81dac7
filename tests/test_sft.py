"""Supervised fine-tuning through DeepSpeed's engines at (tp, pp, dp) = (1,1,1), (2,2,1), (2,2,2).

In every layout, on real engines (the plain engine at pp = 1, the pipeline engine at pp = 2):
- masking is exact: one plain SGD step with the prompt tokens' labels replaced by random ids gives the same
  loss and the same updated weights (the update is -lr x gradient) as with the true labels, while changing one
  response label does change them (the control, at (1,1,1): the comparison can fail);
- packing is exact: the per-example losses (each read as the loss of a batch whose loss mask keeps only that
  example) are the same whether each example has its own row or several share one (<= 1e-5, fp32);
- the loss is averaged over the loss tokens of the whole global batch: one SGD step on the packed rows and one on
  the unpacked rows (other micro batches, other token counts per micro batch and per dp rank) give the same loss
  and the same weights; a mean of per-micro-batch means would not.
The per-example losses also agree across the three layouts. In the (2,2,1) launch, ``mtnlg train`` also
fine-tunes a Llama-family Hugging Face model imported at tp = pp = 1 (weights loaded into tp = pp = 2, a fresh
optimizer); its export loads in transformers with mtnlg's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_helper import ds_config, run_distributed
from tests.helpers import load_hf

SEQ = 64
EXAMPLES = 8
MBS = 2
RTOL = 1e-5
MODEL = {"architecture": "llama", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2,
         "seq_length": SEQ}
LAYOUTS = {1: (1, 1), 4: (2, 2), 8: (2, 2)}  # world -> (tp, pp)


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """Nothing from the hub (the spawned ranks inherit the environment)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> dict:
    """A tokenizer trained on the demo set of a few stdlib modules, and that set preprocessed with --sft."""
    from mtnlg.data.demo_sft import write_demo_sft
    from mtnlg.data.readers import iter_documents
    from mtnlg.data.sft import preprocess_sft
    from mtnlg.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sft")
    write_demo_sft(root / "demo", limit_modules=12)
    rows = [json.loads(line) for line in (root / "demo" / "train.jsonl").read_text().splitlines()]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": r["prompt"] + r["response"]}) + "\n" for r in rows))
    tok = train_tokenizer(iter_documents([root / "text.jsonl"]), 320, root / "tok")
    preprocess_sft([root / "demo" / "train.jsonl"], tok, root / "sft", max_length=SEQ + 1, log=lambda _m: None)
    # each example's prompt, as token ids, from the raw rows (not from the loss mask under test)
    prompts = [tok.encode(r["prompt"]) for r in rows]
    return {"prefix": str(root / "sft"), "tokenizer": str(root / "tok"), "root": str(root),
            "import": import_hf_llama(tok, root), "prompts": prompts}


def import_hf_llama(tok, root: Path) -> str:
    """A tiny random LlamaForCausalLM with the test tokenizer, imported by `mtnlg import-hf` at tp = pp = 1."""
    import transformers

    from mtnlg.cli import main

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=tok.vocab_size, max_position_embeddings=SEQ,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=tok.eod_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(root / "hf"))
    tok.hf.save_pretrained(str(root / "hf"))
    assert main(["import-hf", "--model", str(root / "hf"), "--output", str(root / "imported")]) == 0
    return str(root / "imported")


def sft_config(data: dict, tp: int, pp: int, packing: bool = True, recompute: str = "none", sp: bool = False):
    from mtnlg.config import from_dict

    return from_dict({
        "model": {**MODEL, "recompute": recompute}, "parallel": {"tensor": tp, "pipeline": pp, "sequence_parallel": sp},
        "train": {"iters": 1, "micro_batch_size": MBS, "global_batch_size": EXAMPLES, "lr": 1.0, "min_lr": 0.0,
                  "warmup_iters": 0, "lr_decay": "constant", "weight_decay": 0.0, "clip_grad": 0.0, "seed": 5},
        "data": {"sft": {"prefix": data["prefix"], "packing": packing}, "tokenizer": data["tokenizer"],
                 "split": "100,0,0"},
        "deepspeed_config": ds_config(1, "sgd"),
    })


class Rows:
    """An SFT source over chosen rows of examples; ``keep``: only these examples' tokens are in the loss;
    ``relabel``: "prompt" replaces every label that is a prompt token (``prompts``: each example's prompt ids, from
    the raw data) and the padding's; "response" changes one label in the loss."""

    sft = True

    def __init__(self, ds, rows: list[list[int]], keep: set[int] | None = None, relabel: str | None = None,
                 prompts: list[list[int]] | None = None):
        self.ds, self.rows, self.keep, self.relabel, self.prompts = ds, rows, keep, relabel, prompts

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        self.ds.rows = self.rows
        s = self.ds[i]
        if self.keep is not None:
            for seg, e in enumerate(self.rows[i]):
                if e not in self.keep:
                    s.loss_mask[s.segment_ids == seg] = 0
        if self.relabel == "prompt":  # every label that is a prompt token, and the padding's: random ids
            rng = np.random.RandomState(i)
            off = s.segment_ids == len(self.rows[i])  # padding
            for seg, e in enumerate(self.rows[i]):
                at = int(np.flatnonzero(s.segment_ids == seg)[0])
                p = len(self.prompts[e])
                assert list(self.ds.tokens.get(e, 0, p)) == self.prompts[e]  # the example starts with its prompt
                off[at : at + p - 1] = True  # inputs 0..p-2 predict prompt tokens 1..p-1
            s.labels[off] = rng.randint(0, 300, int(off.sum()))
        elif self.relabel == "response" and i == 0:  # one label in the loss
            j = int(np.flatnonzero(s.loss_mask)[0])
            s.labels[j] = (s.labels[j] + 1) % 300
        return s

    def loss_tokens(self, i: int) -> int:
        return int(np.count_nonzero(self[i].loss_mask))


def pack(examples: list[int], sizes: np.ndarray, n_rows: int) -> list[list[int]]:
    """Greedy packing of ``examples`` (rows of at most SEQ (input, label) pairs), then empty rows up to n_rows."""
    rows, fill = [[]], 0
    for e in examples:
        n = int(sizes[e]) - 1
        if rows[-1] and fill + n > SEQ:
            rows.append([])
            fill = 0
        rows[-1].append(e)
        fill += n
    assert len(rows) <= n_rows
    return rows + [[] for _ in range(n_rows - len(rows))]


def _sft_layout(rank: int, world: int, data: dict) -> dict:
    from mtnlg.config import resolve
    from mtnlg.data.sft_dataset import SFTDataset
    from mtnlg.parallel import ParallelState
    from mtnlg.training.engine import Engine
    from mtnlg.training.loop import micro_batches
    from mtnlg.training.sources import data_tokenizer, with_vocab

    tp, pp = LAYOUTS[world]
    device = torch.device("cpu")
    cfg = sft_config(data, tp, pp)
    cfg = resolve(with_vocab(cfg, data_tokenizer(cfg)), world)
    ps = ParallelState.create(tp, pp)
    ds = SFTDataset(data["prefix"], SEQ, seed=0, packing=False, num_samples=0)
    short = [int(e) for e in np.flatnonzero(ds.tokens.sizes <= SEQ // 2)]
    examples = short[:EXAMPLES]
    unpacked = [[e] for e in examples]
    packed = pack(examples, ds.tokens.sizes, EXAMPLES)
    per_rank = EXAMPLES // (MBS * ps.dp_size)

    def batches(source):
        return micro_batches(source, 0, cfg, ps, device, count=per_rank)

    def params(engine):
        return [p.detach().clone() for p in engine.module.parameters()]

    out: dict = {"packed_rows": packed, "examples": examples}
    engine = Engine(cfg, ps, device)
    out["per_example"] = {
        name: [engine.eval_loss(batches(Rows(ds, rows, keep={e}))) for e in examples]
        for name, rows in (("unpacked", unpacked), ("packed", packed))
    }
    before = params(engine)
    steps = {}
    runs = [("true", Rows(ds, unpacked)),
            ("prompt_relabelled", Rows(ds, unpacked, relabel="prompt", prompts=data["prompts"])),
            ("packed", Rows(ds, packed))]
    if world == 1:  # the control, once: the comparison sees a changed label in the loss
        runs.append(("response_relabelled", Rows(ds, unpacked, relabel="response")))
    for name, source in runs:
        if name != "true":
            engine = Engine(cfg, ps, device)
        result = engine.train_step(batches(source))
        after = params(engine)
        steps[name] = {"loss": result.loss, "grad_norm": result.grad_norm, "params": after}
    if world == 4:  # the packed step again with full recompute and sequence parallelism inside the pipeline
        sp_cfg = resolve(with_vocab(sft_config(data, tp, pp, recompute="full", sp=True), data_tokenizer(cfg)), world)
        engine = Engine(sp_cfg, ParallelState.create(tp, pp, sequence_parallel=True), device)
        result = engine.train_step(batches(Rows(ds, packed)))
        steps["packed_full_recompute_sp"] = {"loss": result.loss, "grad_norm": result.grad_norm,
                                             "params": params(engine)}
        out["finetune"] = _finetune_import(data)
    ref = steps["true"]["params"]
    out["moved"] = max(float((a - b).abs().max()) for a, b in zip(ref, before))
    out["steps"] = {
        name: {"loss": s["loss"], "grad_norm": s["grad_norm"],
               "max_param_diff": max(float((a - b).abs().max()) for a, b in zip(s["params"], ref))}
        for name, s in steps.items()
    }
    return out


def _finetune_import(data: dict) -> dict:
    """``mtnlg train`` (the whole loop) on the SFT data from the tp = pp = 1 import, at tp = pp = 2."""
    from mtnlg.config import load_config
    from mtnlg.training.loop import train

    cfg = load_config(Path(data["import"]) / "mtnlg_config.yaml", [
        "parallel.tensor=2", "parallel.pipeline=2", f"model.seq_length={SEQ}", f"data.tokenizer={data['tokenizer']}",
        f"data.sft={{prefix: {data['prefix']}, packing: true}}", "data.split='100,0,0'", "train.iters=3",
        f"train.micro_batch_size={MBS}", "train.global_batch_size=8", "train.lr=3e-3", "train.eval_interval=0",
        "train.precision=fp32", "train.peak_tflops=1.0", f"checkpoint.load={data['import']}",
        f"checkpoint.save={data['root']}/finetuned", f"deepspeed_config={ds_config(1)}",
    ])
    summary = train(cfg)
    return {"losses": summary.losses, "checkpoint": summary.checkpoint}


@pytest.fixture(scope="module")
def layouts(sft_data) -> dict:
    """world -> rank 0's results (every rank checked to agree on the losses)."""
    out = {}
    for world in LAYOUTS:
        results = run_distributed(_sft_layout, world, args=(sft_data,))
        for r in results[1:]:
            assert r["per_example"] == results[0]["per_example"]
        out[world] = results[0]
    return out


@pytest.mark.parametrize("world", list(LAYOUTS))
def test_packed_equals_unpacked_per_example(layouts, world):
    r = layouts[world]
    assert any(len(row) > 1 for row in r["packed_rows"]), "no row holds two examples: packing was not tested"
    a, b = np.array(r["per_example"]["unpacked"]), np.array(r["per_example"]["packed"])
    assert np.all(np.isfinite(a)) and len(set(a.round(4))) == len(a)  # distinct examples, distinct losses
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=0)


@pytest.mark.parametrize("world", list(LAYOUTS))
def test_masking_is_exact(layouts, world):
    s, moved = layouts[world]["steps"], layouts[world]["moved"]
    assert moved > 1e-3  # the step did change the weights
    assert s["prompt_relabelled"]["loss"] == pytest.approx(s["true"]["loss"], rel=1e-7)
    assert s["prompt_relabelled"]["max_param_diff"] <= 1e-7 * max(1.0, moved)
    if world == 1:  # the control: a label inside the loss changes loss and weights
        assert abs(s["response_relabelled"]["loss"] - s["true"]["loss"]) > 1e-4
        assert s["response_relabelled"]["max_param_diff"] > 1e-4


@pytest.mark.parametrize("world", list(LAYOUTS))
def test_loss_is_a_mean_over_the_global_batch_tokens(layouts, world):
    s = layouts[world]["steps"]
    assert s["packed"]["loss"] == pytest.approx(s["true"]["loss"], rel=RTOL)
    if s["true"]["grad_norm"] is not None:
        assert s["packed"]["grad_norm"] == pytest.approx(s["true"]["grad_norm"], rel=RTOL)
    assert s["packed"]["max_param_diff"] <= RTOL * layouts[world]["moved"]


def test_full_recompute_and_sequence_parallel_keep_documents_apart(layouts):
    """(2,2,1): the packed step with full recompute and sequence parallelism equals the unpacked step."""
    s = layouts[4]["steps"]
    assert s["packed_full_recompute_sp"]["loss"] == pytest.approx(s["true"]["loss"], rel=RTOL)
    assert s["packed_full_recompute_sp"]["grad_norm"] == pytest.approx(s["true"]["grad_norm"], rel=RTOL)
    assert s["packed_full_recompute_sp"]["max_param_diff"] <= RTOL * layouts[4]["moved"]


def test_finetuned_import_exports_with_equal_logits(layouts, sft_data, tmp_path):
    from mtnlg.cli import main
    from mtnlg.eval.loading import open_model

    ft = layouts[4]["finetune"]
    assert sorted(ft["losses"]) == [1, 2, 3] and ft["losses"][3] < ft["losses"][1]
    assert main(["export-hf", "--checkpoint", str(Path(sft_data["root"]) / "finetuned"), "--output",
                 str(tmp_path / "hf")]) == 0
    hf, base = load_hf(tmp_path / "hf"), load_hf(Path(sft_data["root"]) / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    mtnlg = open_model(checkpoint=str(Path(sft_data["root"]) / "finetuned")).generator.model
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs, before = mtnlg(ids), hf(input_ids=ids).logits, base(input_ids=ids).logits
    assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())
    assert float((theirs - before).abs().max()) > 1e-2  # fine-tuning moved the imported weights ...
    # ... by what 3 AdamW steps of lr 3e-3 can (|update| <~ lr per step): it started from them
    moved = [float((a - b).abs().max()) for a, b in zip(hf.state_dict().values(), base.state_dict().values())]
    assert 0 < max(moved) <= 4 * 3 * 3e-3, moved

    # generate-match through the CLI, on the checkpoint and on its export: the same answers
    heldout = Path(sft_data["root"]) / "demo" / "heldout.jsonl"
    for flag, path in (("--checkpoint", Path(sft_data["root"]) / "finetuned"), ("--hf", tmp_path / "hf")):
        out = tmp_path / f"match{flag}.json"
        assert main(["evaluate", flag, str(path), "--task", "generate-match", "--data", str(heldout), "--limit", "6",
                     "--max-new-tokens", "4", "--output", str(out)]) == 0
    native, exported = (json.loads((tmp_path / f"match{f}.json").read_text()) for f in ("--checkpoint", "--hf"))
    assert native["examples"] == 6 and set(native["by_kind"]) <= {"name", "params", "count", "summary"}
    assert [s["generated"] for s in native["samples"]] == [s["generated"] for s in exported["samples"]]


def test_layouts_agree(layouts):
    ref = np.array(layouts[1]["per_example"]["unpacked"])
    for world in (4, 8):
        np.testing.assert_allclose(np.array(layouts[world]["per_example"]["unpacked"]), ref, rtol=RTOL)
        assert layouts[world]["steps"]["true"]["loss"] == pytest.approx(layouts[1]["steps"]["true"]["loss"], rel=RTOL)
