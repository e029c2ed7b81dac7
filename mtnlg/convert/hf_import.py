"""A Hugging Face model of a type some family maps to (``mtnlg.convert.hf``: GPT-2, Llama, Qwen2, Mistral; safetensors)
-> a weights-only mtnlg checkpoint for any (tp, pp).

    import_hf("hf/gpt2", "runs/gpt2-ft", ["parallel.tensor=2", "parallel.pipeline=2"])
    # then: mtnlg train --config runs/gpt2-ft/mtnlg_config.yaml --set checkpoint.save=runs/ft

The run config is derived from ``config.json`` (+ ``--set`` overrides) and written as
``<out>/mtnlg_config.yaml`` (and in ``global_step0/``), with ``checkpoint.load`` = the output, a
DeepSpeed JSON ``<out>/ds_config.json`` (ZeRO-1) and ``data.tokenizer`` = ``<out>/tokenizer`` (the
HF directory's tokenizer, copied) when there is one. Everything is checked (architecture,
names, shapes) before anything is written, and written to a temporary directory renamed at the end.
Pickled weights (``pytorch_model.bin``) are refused: they can run arbitrary code on load.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from mtnlg.checkpoint.reader import resolve_model
from mtnlg.checkpoint.tags import CONFIG_NAME, TOKENIZER_DIR
from mtnlg.checkpoint.writer import write_weights_only
from mtnlg.config import ConfigError, ModelConfig, RunConfig, apply_override, from_dict, save_config
from mtnlg.convert import keymaps
from mtnlg.convert.hf import adapter, model_types
from mtnlg.convert.safetensors_io import HFWeights
from mtnlg.errors import UserError
from mtnlg.files import atomic_dir
from mtnlg.model.layout import groups

IGNORED = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")  # buffers, not weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
DS_CONFIG_NAME = "ds_config.json"
DEFAULT_DS_CONFIG = {  # ds_configs/zero1.json
    "zero_optimization": {"stage": 1},
    "fp16": {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
             "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8}},
}
HF_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}


def read_hf_config(model_dir: Path) -> tuple[str, object, dict]:
    """(model_type, transformers config, raw config.json) of a supported HF model directory."""
    if not model_dir.is_dir():
        raise UserError(f"HF model directory {model_dir} not found")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json; pass a directory written by save_pretrained")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: malformed JSON ({e}); fix or re-save the config") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in model_types():
        arch = ", ".join(raw.get("architectures") or []) if isinstance(raw, dict) else ""
        raise UserError(
            f"{path}: model_type {kind!r}{f' ({arch})' if arch else ''} is not supported; import-hf reads "
            + ", ".join(f"{t} ({adapter(t).HF_CLASS})" for t in model_types()) + " models"
        )
    try:
        hf = adapter(kind).config_class().from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a valid {kind} config ({str(e).splitlines()[0][:150]})") from None
    return kind, hf, raw


def model_section(kind: str, hf, where: Path) -> dict:
    """The ``model:`` section of the run config for an HF config (refusing what mtnlg cannot represent)."""
    def refuse(what: str) -> None:
        raise UserError(f"{where}: {what} is not supported by mtnlg's {kind} architecture; it cannot be imported")

    return adapter(kind).model_section(hf, refuse)


def _expected(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every weight the model needs (computed on meta tensors, no data)."""
    out = {}
    for group in groups(model_cfg):
        meta = {local: torch.empty(s.full_shape, device="meta") for local, s in group.params}
        out.update({k: tuple(v.shape) for k, v in keymaps.to_hf(model_cfg, group, meta).items()})
    return out


def _name_resolver(weights: HFWeights, kind: str):
    """HF names as this directory spells them (GPT2Model-style checkpoints lack 'transformer.')."""
    have = set(weights.keys())
    spelled = getattr(adapter(kind), "hf_name", None)

    def actual(name: str) -> str | None:
        if spelled is not None:
            return spelled(name, have)
        return name if name in have else None

    return actual


def check_weights(weights: HFWeights, model_cfg: ModelConfig, kind: str, where: Path) -> None:
    """Every weight present with the shape config.json implies, and nothing unexplained left over."""
    actual = _name_resolver(weights, kind)
    used = set()
    for name, shape in _expected(model_cfg).items():
        real = actual(name)
        if real is None:
            raise UserError(f"{where}: weight {name} is missing; the files do not hold a full {kind} model")
        if weights.shapes[real] != shape:
            raise UserError(
                f"{where}: weight {real} has shape {list(weights.shapes[real])} but config.json implies "
                f"{list(shape)}; the config does not match the weights"
            )
        used.add(real)
    tied_copies = set(getattr(adapter(kind), "TIED_COPIES", ()))  # copies of tied weights (BERT's decoder)
    for name in weights.keys():
        if name in used or IGNORED.match(name) or (model_cfg.tie_embeddings and name == "lm_head.weight") \
                or name in tied_copies:
            continue
        if getattr(adapter(kind), "ignored", lambda _: False)(name):
            continue
        raise UserError(f"{where}: unexpected weight {name}; not a plain {adapter(kind).HF_CLASS} checkpoint")


def run_config_from_hf(kind: str, hf, raw: dict, model_dir: Path, output: Path, overrides: list[str],
                       has_tokenizer: bool) -> RunConfig:
    out = output.resolve()
    data = {"tokenizer": str(out / TOKENIZER_DIR)} if has_tokenizer else {}
    tree: dict = {
        "model": model_section(kind, hf, model_dir / "config.json"),
        "train": {"precision": HF_PRECISION.get(str(raw.get("dtype") or raw.get("torch_dtype")), "fp32")},
        "data": data,
        "checkpoint": {"load": str(out)},
        "deepspeed_config": str(out / DS_CONFIG_NAME),
    }
    try:
        for item in overrides:
            apply_override(tree, item)
        return from_dict(tree)
    except ConfigError as e:
        raise UserError(str(e)) from None


def copy_tokenizer(src: Path, dst: Path) -> bool:
    """Copy an HF tokenizer's files (if any) and check that they load; True if there was one."""
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.json", "tokenizer.model") for f in files):
        return False
    dst.mkdir()
    for f in files:
        shutil.copy2(f, dst / f.name)
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(dst), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        first = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise UserError(f"{src}: its tokenizer files do not load ({first}); fix or remove them") from None
    return True


def import_hf(model_dir: str | Path, output: str | Path, overrides: list[str] | None = None,
              overwrite: bool = False) -> Path:
    """Convert an HF GPT-2/Llama/Qwen2/Mistral directory to a weights-only mtnlg checkpoint; returns the output."""
    model_dir, output = Path(model_dir), Path(output)
    check_output(output, overwrite)
    kind, hf, raw = read_hf_config(model_dir)
    weights = HFWeights(model_dir)
    has_tokenizer = any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model"))
    run_cfg = run_config_from_hf(kind, hf, raw, model_dir, output, overrides or [], has_tokenizer)
    tp, pp = run_cfg.parallel.tensor, run_cfg.parallel.pipeline
    model_cfg = resolve_model(run_cfg, tp, pp, "import-hf")
    check_weights(weights, model_cfg, kind, model_dir)
    actual = _name_resolver(weights, kind)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return weights.get(actual(name))

    with atomic_dir(output) as tmp:
        write_weights_only(tmp, run_cfg, model_cfg, lambda g: keymaps.from_hf(model_cfg, g, get),
                           source=str(model_dir.resolve()))
        if has_tokenizer:
            copy_tokenizer(model_dir, tmp / TOKENIZER_DIR)
        (tmp / DS_CONFIG_NAME).write_text(json.dumps(DEFAULT_DS_CONFIG, indent=2) + "\n")
        save_config(run_cfg, tmp / CONFIG_NAME)
    return output


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output {output} exists and is not empty; remove it or pass --overwrite")
