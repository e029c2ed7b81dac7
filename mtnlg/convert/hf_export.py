"""An mtnlg checkpoint (any layout) -> a Hugging Face directory of the class its HF adapter names
(``mtnlg.convert.hf``: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).

    export_hf("runs/tiny", "hf/tiny", dtype="bf16", verify=True)

Writes ``config.json``, ``generation_config.json``, safetensors weights (one file, or shards +
``model.safetensors.index.json`` above ``max_shard_size``) and the checkpoint's tokenizer. The
weights are the fp32 masters when the checkpoint has them. One layer group is read, merged,
mapped (``keymaps``) and streamed to disk at a time; the output appears only when complete
(a temporary directory renamed at the end).

``verify`` loads the written directory with transformers and compares its logits with mtnlg's
own model (tp=1) holding the same weights, both computed in fp32: for a bf16/fp16 export the
mtnlg model gets the same rounded weights, so any difference is a conversion error, not rounding.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mtnlg.checkpoint.reader import NativeCheckpoint, load_native_model, open_checkpoint
from mtnlg.config import ModelConfig
from mtnlg.convert import keymaps
from mtnlg.convert.hf import adapter_for
from mtnlg.convert.hf_import import check_output
from mtnlg.convert.safetensors_io import ShardedWriter, parse_size
from mtnlg.errors import UserError
from mtnlg.files import atomic_dir
from mtnlg.model.layout import groups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAME = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
VERIFY_TOL = 1e-5  # max abs logit difference, relative to max(1, max |logit|)


@dataclass
class ExportResult:
    output: Path
    iteration: int
    source: str  # "master" or "module"
    files: list[str]
    max_abs_diff: float | None = None  # with verify
    tolerance: float | None = None


def hf_config(cfg: ModelConfig, dtype: str, token_ids: dict[str, int | None]):
    """The transformers config of a (resolved) mtnlg model config, for the HF class that represents it exactly
    (its adapter: ``mtnlg.convert.hf.adapter_for``)."""
    adapter = adapter_for(cfg)
    common = {"vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std, "dtype": HF_DTYPE_NAME[dtype],
              "tie_word_embeddings": bool(cfg.tie_embeddings), "architectures": [adapter.HF_CLASS],
              "bos_token_id": token_ids.get("bos"), "eos_token_id": token_ids.get("eos")}
    if token_ids.get("pad") is not None:  # a tokenizer with a pad token (T5's decoder start)
        common["pad_token_id"] = token_ids["pad"]
    return adapter.to_hf_config(cfg, common)


def hf_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor in write order (mapped on meta tensors: no data)."""
    plan = []
    for group in groups(cfg):
        meta = {local: torch.empty(s.full_shape, device="meta") for local, s in group.params}
        plan += [(k, tuple(v.shape)) for k, v in keymaps.to_hf(cfg, group, meta).items()]
    return plan


def _token_ids(tokenizer_dir: Path | None) -> dict[str, int | None]:
    if tokenizer_dir is None:
        return {}
    from mtnlg.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    bos, eos = tok.hf.bos_token_id, tok.hf.eos_token_id
    return {"bos": tok.eod_id if bos is None else bos, "eos": tok.eod_id if eos is None else eos,
            "pad": getattr(tok, "pad_id", None)}


def export_hf(checkpoint: str | Path, output: str | Path, iteration: int | None = None, dtype: str = "fp32",
              max_shard_size: str | int = "5GB", verify: bool = False, source: str = "auto",
              overwrite: bool = False) -> ExportResult:
    """Write the HF directory of a checkpoint; with ``verify``, fail if its logits differ from mtnlg's."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of: {', '.join(DTYPES)}")
    output = Path(output)
    check_output(output, overwrite)
    max_bytes = parse_size(max_shard_size)
    ckpt = open_checkpoint(checkpoint, iteration)
    src = ckpt.source(source)
    cfg = ckpt.model_cfg
    tok_dir = ckpt.tokenizer_dir
    result = ExportResult(output, ckpt.iteration, src, [])
    with atomic_dir(output) as tmp:
        writer = ShardedWriter(tmp, hf_plan(cfg), DTYPES[dtype], max_bytes)
        for group, tensors in ckpt.iter_groups(src):
            for name, x in keymaps.to_hf(cfg, group, tensors).items():
                writer.write(name, x)
            del tensors
        writer.close()
        ids = _token_ids(tok_dir)
        config = hf_config(cfg, dtype, ids)
        config.save_pretrained(str(tmp))
        gen = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos")}
        if getattr(config, "is_encoder_decoder", False):  # T5: generate starts the decoder with its start token
            gen.update(decoder_start_token_id=config.decoder_start_token_id, pad_token_id=config.pad_token_id)
        GenerationConfig(**gen).save_pretrained(str(tmp))
        if tok_dir is not None:
            for f in tok_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if verify:
            result.max_abs_diff, result.tolerance = verify_export(tmp, ckpt, dtype, src)
            if result.max_abs_diff > result.tolerance:
                raise UserError(
                    f"--verify failed: transformers' logits differ from mtnlg's by {result.max_abs_diff:.3g} "
                    f"(tolerance {result.tolerance:.3g}); nothing was written to {output}"
                )
        result.files = sorted(f.name for f in tmp.iterdir())
    return result


def sample_ids(vocab_size: int, seq_len: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


@torch.no_grad()
def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise), so two models never add up."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def verify_export(hf_dir: Path, ckpt: NativeCheckpoint, dtype: str, source: str) -> tuple[float, float]:
    """(max abs logit difference, tolerance) between the written HF model and mtnlg's model.

    The two models are loaded one after the other, so memory holds one model (plus logits). A causal LM is run on
    token ids; an adapter with ``verify_inputs`` / ``hf_outputs`` (BERT: sentence pairs with padding, MLM and
    sentence-order logits) says what both run on and what is compared.
    """
    import gc

    import transformers

    cfg = ckpt.model_cfg
    adapter = adapter_for(cfg)
    own = hasattr(adapter, "hf_outputs")
    inputs = adapter.verify_inputs(cfg) if own else \
        sample_ids(cfg.vocab_size, min(cfg.seq_length, cfg.max_position_embeddings, 128))
    native, _, _ = load_native_model(ckpt.tag_dir, dtype=torch.float32, source=source)
    with torch.no_grad():
        for p in native.parameters():  # the same rounding as the written weights
            p.copy_(p.to(DTYPES[dtype]).float())
        ref = native(inputs)
        ref = tuple(r.float() for r in ref) if isinstance(ref, tuple) else (ref.float(),)
    del native
    gc.collect()
    _release_freed_memory()
    name = adapter.class_name(cfg) if hasattr(adapter, "class_name") else adapter.HF_CLASS  # BERT: by its head
    hf_class = getattr(transformers, name) if own else transformers.AutoModelForCausalLM
    hf_model = hf_class.from_pretrained(str(hf_dir), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        got = adapter.hf_outputs(hf_model, inputs) if own else (hf_model(input_ids=inputs).logits,)
    del hf_model
    diff = max(float((g.float()[..., : r.shape[-1]] - r).abs().max()) for g, r in zip(got, ref))
    return diff, VERIFY_TOL * max(1.0, max(float(r.abs().max()) for r in ref))
