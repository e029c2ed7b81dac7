"""The DeepSpeed JSON: it owns ZeRO, precision details and optimizer details; the YAML owns the rest.

mtnlg fills in what the run config already states (batch sizes, precision, gradient clipping,
learning rate, weight decay) and refuses a JSON that states any of them differently, so no
number lives in two places. The JSON may still carry them, if they agree.

With no ``deepspeed_config`` at all a run gets ``DEFAULT``: ZeRO stage 1, which works for every
preset, layout and precision (DeepSpeed's stage 0 cannot take bf16/fp16 under tensor or pipeline
parallelism, see below).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mtnlg.config import ConfigError, RunConfig

ADAM_TYPES = {"adam", "adamw"}
OPTIMIZER_TYPES = ADAM_TYPES | {"sgd"}
DEFAULT: dict[str, Any] = {"zero_optimization": {"stage": 1}}  # the DeepSpeed config of a run that names none


def load_ds_json(path: str | Path | None) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path``; ``DEFAULT`` when there is none."""
    if path is None:
        return copy.deepcopy(DEFAULT)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed_config {p} not found (relative paths start at the current directory)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: malformed JSON ({e.msg}); fix the DeepSpeed config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a DeepSpeed config must be a JSON object")
    return data


def _agree(ds: dict, key: str, value: Any, yaml_key: str, name: str) -> None:
    """Set ``ds[key] = value`` unless the JSON already states something else."""
    if key in ds and ds[key] != value and not (isinstance(value, float) and _close(ds[key], value)):
        raise ConfigError(
            f"{name}: '{key}' is {ds[key]!r} but the run config gives {yaml_key} = {value!r}; "
            f"remove '{key}' from the JSON (mtnlg fills it from the YAML) or change the YAML"
        )
    ds[key] = value


def _close(a: Any, b: float) -> bool:
    try:
        return abs(float(a) - b) <= 1e-12 * max(1.0, abs(b))
    except (TypeError, ValueError):
        return False


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(cfg: RunConfig, user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The complete DeepSpeed config for a resolved run config."""
    name = cfg.deepspeed_config or "the DeepSpeed config"
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed_config) if user is None else user)
    t = cfg.train

    _agree(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size", name)
    _agree(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", name)
    _agree(ds, "gradient_accumulation_steps", t.grad_accum_steps, "train.grad_accum_steps", name)
    _agree(ds, "gradient_clipping", float(t.clip_grad), "train.clip_grad", name)

    for prec in ("bf16", "fp16"):
        section = ds.setdefault(prec, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: '{prec}' must be a JSON object")
        want = t.precision == prec
        if "enabled" in section and bool(section["enabled"]) != want:
            raise ConfigError(
                f"{name}: '{prec}.enabled' is {section['enabled']} but train.precision is {t.precision}; "
                f"remove 'enabled' from the JSON (mtnlg sets it from train.precision)"
            )
        section["enabled"] = want
    if t.precision == "bf16":
        # fp32 gradient accumulation and master weights (DeepSpeed's BF16_Optimizer with ZeRO 0/1)
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        # add each parameter's bf16 gradient into its fp32 buffer as soon as backward produces it and free
        # the bf16 copy: no zeroing and no bf16 accumulation pass per micro batch (benchmarks/README.md), and
        # one bf16 gradient less alive; same sums in the same order. The JSON may say false.
        ds["bf16"].setdefault("immediate_grad_update", True)

    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{name}: zero_optimization.stage = {stage} must be 0, 1, 2 or 3")
    if cfg.parallel.pipeline > 1 and stage > 1:
        raise ConfigError(
            f"{name}: ZeRO stage {stage} cannot be combined with pipeline parallelism (DeepSpeed's pipeline "
            f"engine supports ZeRO 0 and 1); use stage 1 or parallel.pipeline = 1"
        )

    if stage == 0 and t.precision != "fp32":
        raise ConfigError(
            f"{name}: {t.precision} needs ZeRO stage >= 1 (DeepSpeed's stage-0 mixed-precision optimizer "
            f"miscounts tensor- and pipeline-parallel gradient norms); use ds_configs/zero1.json"
        )
    if "scheduler" in ds:
        raise ConfigError(
            f"{name}: remove 'scheduler'; the LR schedule comes from train.lr, min_lr, warmup_iters and lr_decay"
        )
    opt = ds.get("optimizer")
    if opt is not None:
        kind = str(opt.get("type", "")).lower()
        if kind not in OPTIMIZER_TYPES:
            raise ConfigError(f"{name}: optimizer type {opt.get('type')!r} is not supported; use AdamW or SGD")
        params = opt.setdefault("params", {})
        _agree(params, "lr", float(t.lr), "train.lr", name)
        _agree(params, "weight_decay", float(t.weight_decay), "train.weight_decay", name)
    from mtnlg.model.registry import family

    whole = not family(cfg.model).pipe_partitioned  # several tensors with gradients between stages (T5)
    if (cfg.parallel.sequence_parallel or whole) and cfg.parallel.pipeline > 1:
        # DeepSpeed's pipeline engine splits each activation it sends over the tensor-parallel group and gathers it
        # on the other side, assuming every tp rank holds the same tensor; sequence shards differ: send them whole.
        # It splits only the first tensor of a tuple and wants no gradient for the others: send those whole too
        pipe = ds.setdefault("pipeline", {})
        for key in ("pipe_partitioned", "grad_partitioned"):
            if pipe.get(key):
                raise ConfigError(f"{name}: 'pipeline.{key}' is true, which "
                                  + (f"{cfg.model.architecture} cannot use (its stages send several tensors with "
                                     "gradients)" if whole else "sequence parallelism cannot use (each tp rank "
                                     "sends its own sequence shard)") + "; remove it")
            pipe[key] = False
    if stage == 0 and t.precision == "fp32":
        # DeepSpeed's stage-0 fp32 clipping miscounts under pipeline parallelism (replicated parameters of later
        # stages are left out, a tied embedding is counted on both of its stages) and discards the norm it
        # computes; mtnlg's guarded optimizer computes the norm and clips instead (training/guard.py)
        ds["gradient_clipping"] = 0.0
    ds.setdefault("zero_allow_untested_optimizer", True)  # mtnlg's optimizer subclasses (training/guard.py)
    ds.setdefault("steps_per_print", 10**9)  # mtnlg logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def optimizer_kind(ds: dict[str, Any]) -> str:
    """'adamw' or 'sgd': the optimizer the JSON asks for (AdamW when it names none)."""
    kind = str((ds.get("optimizer") or {}).get("type", "adamw")).lower()
    return "adamw" if kind in ADAM_TYPES else kind


def adam_hyperparams(ds: dict[str, Any]) -> dict[str, Any]:
    """betas/eps from the JSON's optimizer section (DeepSpeed's defaults otherwise)."""
    params = (ds.get("optimizer") or {}).get("params", {})
    return {"betas": tuple(params.get("betas", (0.9, 0.999))), "eps": float(params.get("eps", 1e-8))}


def sgd_hyperparams(ds: dict[str, Any]) -> dict[str, Any]:
    """momentum/dampening/nesterov from the JSON's SGD section (plain SGD otherwise)."""
    params = (ds.get("optimizer") or {}).get("params", {})
    return {"momentum": float(params.get("momentum", 0.0)), "dampening": float(params.get("dampening", 0.0)),
            "nesterov": bool(params.get("nesterov", False))}
