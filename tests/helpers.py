"""What several test files share: small run configs and tiny Hugging Face models (tests never import each other)."""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path

import pytest
import torch

from tests.dist_helper import ds_config, run_distributed

ROOT = Path(__file__).resolve().parent.parent
# a tiny run on synthetic data (the bad-input tests train it, then try what a newcomer tries)
TINY = """
model: {architecture: gpt2, num_layers: 2, hidden_size: 32, num_attention_heads: 4, seq_length: 16}
train: {iters: 2, micro_batch_size: 2, global_batch_size: 2, log_interval: 1, peak_tflops: 1.0}
data: {synthetic: {vocab_size: 64, branching: 2}}
deepspeed_config: %s
""" % (ROOT / "ds_configs" / "zero0.json")
STEPS = 5  # steps of the parity runs (tests/test_training.py)
VOCAB, SEQ = 96, 32  # the tiny HF models' vocabulary and positions

MODEL = {
    "gpt2": {"architecture": "gpt2", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
             "vocab_size": 96, "seq_length": 32},
    "llama": {"architecture": "llama", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
              "num_kv_heads": 2, "vocab_size": 96, "seq_length": 32},
}
# encoders (tests/test_bert.py): not in MODEL, which tests/test_training.py runs every layout of
ENCODERS = {
    "megatron_bert": {"architecture": "megatron_bert", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                      "vocab_size": 96, "seq_length": 32},
    "bert": {"architecture": "bert", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
             "vocab_size": 96, "seq_length": 32},
}
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


def run_config(architecture: str, tp: int = 1, pp: int = 1, zero: int = 1, precision: str = "fp32",
               iters: int = STEPS, save: str | None = None, load: str | None = None, model: dict | None = None,
               optimizer: str = "adamw", sp: bool = False, **train):
    from mtnlg.config import from_dict

    return from_dict({
        "model": {**{**MODEL, **ENCODERS}.get(architecture, {**MODEL["llama"], "architecture": architecture}),
                  **(model or {})},
        "parallel": {"tensor": tp, "pipeline": pp, "sequence_parallel": sp},
        "train": {"iters": iters, "micro_batch_size": 2, "global_batch_size": 8, "lr": 2e-3, "min_lr": 2e-4,
                  "warmup_iters": 2, "log_interval": 1, "precision": precision, "seed": 7,
                  "peak_tflops": 1.0, **train},
        "data": {"synthetic": {"branching": 4, "seed": 3}},
        "checkpoint": {"save": save, "load": load, "interval": 0},
        "deepspeed_config": ds_config(zero, optimizer),
    })


FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]


def hf_model(family: str, **overrides):
    """A tiny random HF model: GPT-2 (tied), or Llama / Qwen2 (q, k, v biases) / Mistral with GQA (4 heads / 2 kv
    heads) and an untied head."""
    import transformers

    torch.manual_seed(FAMILIES.index(family))
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                      initializer_range=0.1, bos_token_id=None, eos_token_id=None, **overrides)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        config_class, model_class, extra = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"use_sliding_window": False}),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
        }[family]
        kwargs = {"tie_word_embeddings": False, **extra, **overrides}
        cfg = config_class(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=SEQ,
                           rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                           initializer_range=0.1, bos_token_id=None, eos_token_id=None, **kwargs)
        model = model_class(cfg)
        with torch.no_grad():  # random norm weights and biases, so a swapped norm or a lost bias cannot hide
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                elif name.endswith("bias"):
                    p.uniform_(-0.5, 0.5)
    return model.eval()


def save_hf(model, path: Path, tokenizer=None) -> Path:
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(path))
    return path


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()


def sample(n: int = 3, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def digest(path: Path) -> str:
    """A hash of a file or of a whole directory tree (names and bytes): what "nothing was touched" compares."""
    h = hashlib.sha256()
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in items:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- layout parity (test_training, test_t5)

# fp32 everywhere. Layouts sum the same products in other orders (tp splits the reductions, dp averages
# partial gradients, pipelines accumulate micro batches per stage), so values differ by float32 rounding,
# which AdamW's first steps (update ~ g / sqrt(g^2)) amplify a little: 1e-5 relative is the bound.
RTOL = 1e-5
# the one SGD step: parameter change = -SGD_LR x gradient, large enough to dwarf the float32 rounding of
# "weights after minus weights before" (norm weights start at 1.0, where one ulp is 1.2e-7)
SGD_LR = 100.0


def sgd_step_config(architecture: str, save: str, **kwargs):
    """One plain SGD step (constant lr, no weight decay, no clipping), saved: the update is -lr x gradient (lr:
    SGD_LR unless given)."""
    return run_config(architecture, iters=1, save=save, optimizer="sgd", lr=kwargs.pop("lr", SGD_LR), min_lr=0.0,
                      warmup_iters=0, lr_decay="constant", weight_decay=0.0, clip_grad=0.0, **kwargs)


def train_many(rank: int, world: int, runs: list[dict]) -> list[dict]:
    """Train each run in turn on this process group; return each run's losses, grad norms and ZeRO-3 split."""
    from mtnlg.training.loop import train

    out = []
    for kwargs in runs:
        kwargs = dict(kwargs)
        broken = kwargs.pop("broken_loss_scale", None)
        cfg = sgd_step_config(**kwargs) if kwargs.pop("sgd", False) else run_config(**kwargs)
        with planted_dp_bug(broken):
            summary = train(cfg)
        out.append({"losses": summary.losses, "grad_norms": summary.grad_norms, "skipped": summary.skipped,
                    "record": summary.last_record, "zero3": summary.zero3_partitioned})
    return out


@contextlib.contextmanager
def planted_dp_bug(scale: float | None):
    """A bug planted in training on purpose: data-parallel rank 1's loss, and so its gradient, ``scale`` times what
    it should be (as a rank counting its micro batches wrongly would make it). None: no bug."""
    if scale is None:
        yield
        return
    import torch.distributed as dist

    import mtnlg.model.gpt as gpt

    plain = gpt.GPTLoss.__call__

    def call(self, logits, labels):
        loss = plain(self, logits, labels)
        return loss * scale if dist.get_rank() == 1 else loss

    gpt.GPTLoss.__call__ = call
    try:
        yield
    finally:
        gpt.GPTLoss.__call__ = plain


def parity_results(runs: list[dict], world: int) -> list[dict]:
    results = run_distributed(train_many, world, args=(runs,))
    # every rank reports the same (dp-averaged, pipeline-broadcast) losses and the same global norms
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert a["losses"] == b["losses"]
            assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-12)
    return results[0]


def max_rel(a: dict[int, float], b: dict[int, float], steps: int = STEPS) -> float:
    """The largest relative difference of two runs' per-step values (losses, grad norms), every one finite."""
    assert sorted(a) == sorted(b) and len(a) == steps, (a, b)
    assert all(v is not None and math.isfinite(v) for v in [*a.values(), *b.values()]), (a, b)
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def initial_weights(architecture: str, model: dict | None = None) -> dict[str, torch.Tensor]:
    """The full (tp = 1) initial weights of ``run_config(architecture, model=model)``'s model, by full name
    (vocabulary padded): layout-independent, as the same seed gives the same full tensors in every layout."""
    import dataclasses

    from mtnlg.config import resolve
    from mtnlg.model.registry import family

    cfg = run_config(architecture, model=model)
    one = resolve(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor=1, pipeline=1)), 1)
    return family(one.model).model(one.model, seed=cfg.train.seed).state_dict()


def sgd_update(save: str, architecture: str, model: dict | None = None,
               before: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's change in the one SGD step, at full (tp=1) size: the checkpoint minus the weights before it
    (default: the initial weights of ``architecture`` with ``model``'s overrides)."""
    from mtnlg.checkpoint import full_state_dict

    after = full_state_dict(save)
    init = initial_weights(architecture, model) if before is None else before
    return {name: w - init[name][: w.shape[0]] for name, w in after.items()}  # [:V]: no vocabulary padding


def update_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest per-parameter ||a - b|| / ||b|| (b the reference). A reference below 1e-6 of the largest is zero
    by symmetry (a bias before a softmax that ignores shifts: a choice scorer's, a span head's) and float noise:
    such a parameter is compared on the scale of the largest."""
    assert sorted(a) == sorted(b)
    scale = max(float(v.norm()) for v in b.values())

    def rel(k: str) -> float:
        ref = float(b[k].norm())
        return float((a[k] - b[k]).norm()) / (ref if ref >= 1e-6 * scale else scale)

    diffs = {k: rel(k) for k in b}
    worst = max(diffs, key=diffs.get)
    print(f"  (worst parameter {worst}: {diffs[worst]:.1e})")
    return diffs[worst]
