"""The run config: one typed tree of dataclasses, loaded strictly from YAML.

    cfg = load_config("examples/tiny_3d.yaml", overrides=["train.iters=20"])
    cfg = resolve(cfg, world_size=8)       # derives data size, grad accumulation, padded vocab

Every number has one source of truth. Values that follow from others (``parallel.data``,
``train.grad_accum_steps``, ``model.padded_vocab_size``, ...) are derived by ``resolve``;
if a user states one anyway it must agree, or ``resolve`` says which keys disagree.
Any problem is a ``ConfigError`` whose message is one line: what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtnlg import families
from mtnlg.errors import JobError


class ConfigError(JobError):
    """A user error in a run config; its message is one line. Every rank reads the same config, so every
    rank raises it and only rank 0 prints it."""


# --------------------------------------------------------------------------- sections


class Architecture(str):
    """A ``model.architecture`` value: one of the registered families' architectures (``mtnlg.families``), each
    naming a set of knob defaults (and the Hugging Face class export prefers); every knob it sets can be stated in
    the YAML instead. Export picks the HF class that represents the result exactly, or refuses."""


KNOBS = ("norm", "activation", "position_embedding", "bias", "qkv_bias", "tie_embeddings", "rope_theta")


@dataclass
class ModelConfig:
    architecture: Architecture | None = None  # default gpt2; the registered ones: mtnlg.families
    preset: Literal["gpt2", "llama"] | None = None  # deprecated alias of architecture (one release)
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_kv_heads: int | None = None  # default: num_attention_heads (MHA); 1 = MQA
    # width of one attention head (Megatron's --kv-channels, HF T5's d_kv); default hidden_size / num_attention_heads.
    # T5 only (T5-11B: 128 heads of 128 over d_model 1024)
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None  # default: 4h (gelu), 8h/3 rounded up to 64 (swiglu)
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # learned positions: the table size; default seq_length
    vocab_size: int | None = None  # default: the tokenizer's (or the synthetic source's); padded for TP
    make_vocab_size_divisible_by: int = 128  # Megatron: padded to a multiple of this * tp
    padded_vocab_size: int | None = None  # derived
    # the architecture's knobs (None: the architecture's default)
    norm: Literal["layernorm", "rmsnorm"] | None = None
    # tanh GELU MLP, exact (erf) GELU MLP (BERT), or SwiGLU with a fused [gate; up]
    activation: Literal["gelu", "gelu_erf", "swiglu"] | None = None
    position_embedding: Literal["learned", "rope"] | None = None
    bias: bool | None = None  # biases on every linear layer (qkv, attention output, MLP)
    qkv_bias: bool | None = None  # biases on q, k and v (default: bias); Qwen2's are on q, k, v only
    tie_embeddings: bool | None = None  # the output layer reuses the token embedding
    rope_theta: float | None = None
    norm_eps: float = 1e-5
    # each residual sub-layer normalised before it (pre: GPT-2, Llama, Megatron) or after the residual sum (post:
    # the original Transformer and BERT)
    norm_position: Literal["pre", "post"] = "pre"
    # the knobs only the architecture's family has (``mtnlg.families``: its ``knobs`` dataclass); stated in the YAML
    # beside the others
    family_knobs: Any = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    # activations recomputed in backward instead of kept: none; selective (the attention core: QK^T, softmax,
    # dropout, AV; Korthikanti et al. 2022); full (every transformer block from its input)
    recompute: Literal["none", "selective", "full"] = "none"
    activation_checkpointing: bool | None = None  # deprecated: true is recompute: full

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    data: int | None = None  # derived: world_size / (tensor * pipeline)
    # outside the tensor-parallel GEMMs (norms, dropout, residuals) each tp rank holds seq_length / tensor
    # of the sequence (Megatron's sequence parallelism; needs tensor > 1)
    sequence_parallel: bool = False


@dataclass
class TrainConfig:
    iters: int = 100
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # default: micro_batch_size * data * grad_accum_steps
    grad_accum_steps: int | None = None  # derived from the two above
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    warmup_iters: int = 0
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: int | None = None  # default: iters
    weight_decay: float = 0.1
    clip_grad: float = 1.0  # 0 disables clipping
    log_interval: int = 10
    eval_interval: int = 0  # 0: no validation during training
    eval_iters: int = 10  # global batches of validation data per evaluation
    peak_tflops: float | None = None  # for MFU; default: measured GEMM peak (CPU) or nominal (GPU)
    max_consecutive_nonfinite: int = 5  # stop after this many steps in a row with a NaN/Inf loss or gradient
    spike_factor: float = 10.0  # log a loss above this many times its running mean
    collective_timeout_s: float = 600.0  # a rank waiting longer for the others fails instead of hanging
    exit_interval: int = 0  # save and stop at the first iteration divisible by this (0: never); schedule unchanged
    exit_duration_mins: float = 0.0  # save and stop once this run has trained this long (0: no limit)
    deterministic: bool = False  # torch's deterministic algorithms (bit-exact reruns on GPUs; slower)


@dataclass
class BlendItem:
    prefix: str
    weight: float = 1.0


@dataclass
class SyntheticConfig:
    """A fixed random Markov chain over ``vocab_size`` tokens (see mtnlg.data.synthetic)."""

    vocab_size: int | None = None  # default: model.vocab_size
    branching: int = 4  # successors per token; the chain's entropy is at most log(branching)
    seed: int = 0


@dataclass
class SFTConfig:
    """Supervised fine-tuning on a ``mtnlg preprocess --sft`` output (token ids + loss mask; mtnlg.data.sft)."""

    prefix: str
    packing: bool = True  # several examples per row, attention kept inside each (document masks, positions reset)
    # checkpoint.load of another run (not checkpoint.save): load its weights only (any layout), with a fresh
    # optimizer and schedule from iteration 0; false: resume it as is (same layout, or a resharded one)
    fresh_optimizer: bool = True


@dataclass
class DataConfig:
    prefix: str | None = None  # PREFIX of PREFIX.bin / PREFIX.idx
    blend: list[BlendItem] | None = None
    synthetic: SyntheticConfig | None = None
    sft: SFTConfig | None = None  # fine-tuning data instead of prefix/blend/synthetic
    tokenizer: str | None = None  # an HF tokenizer directory
    vocab_file: str | None = None  # GPT-2 style encoder.json (with merge_file), or alone a BERT WordPiece vocab.txt
    merge_file: str | None = None  # GPT-2 style vocab.bpe
    lower_case: bool | None = None  # a BERT vocab.txt: lower-case the text (None: if the vocab has no capitals)
    split: str = "98,1,1"  # train,valid,test proportions, by documents
    cache_dir: str | None = None  # sample-index cache; default: next to the data


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    interval: int = 0  # 0: only at the end of training
    keep_last: int | None = None  # prune older checkpoints once a newer one is complete


@dataclass
class LoggingConfig:
    tensorboard: str | None = None  # directory for TensorBoard event files
    # DeepSpeed's own console output: "quiet" keeps its warnings and errors but not its set-up prints (topology,
    # memory reports, seeds, op builds); "info" shows everything it prints
    deepspeed: Literal["quiet", "info"] = "quiet"


@dataclass
class EvalConfig:
    """Downstream evaluation with lm-evaluation-harness during training (needs the ``eval`` extra)."""

    tasks: list[str] | None = None  # lm-eval task names, e.g. [lambada_local, wikitext_local]
    include_path: str | None = None  # a directory of task YAMLs (e.g. examples/eval)
    interval: int = 0  # every N iterations (and at the end); 0 = never
    limit: int | None = None  # examples per task


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (see mtnlg.training.distill)."""

    teacher: str | None = None  # an mtnlg checkpoint directory (any layout) or an `mtnlg import-hf` output
    temperature: float = 1.0  # T: both distributions are softmax(logits / T); the KL term is scaled by T^2
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM loss


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig | None = None  # optional: the section's presence turns distillation on
    deepspeed_config: str | None = None  # path to a DeepSpeed JSON (ZeRO, precision details)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults) and apply ``a.b=c`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass an existing YAML file to --config")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text; a run config is a YAML file") from None
        if not text.strip():
            raise ConfigError(f"config file {p} is empty; write a run config (see examples/tiny_3d.yaml)")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(f"{where}: malformed YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a run config must be a YAML mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        apply_override(raw, item)
    if isinstance(raw.get("model"), dict) and raw["model"].get("preset") is not None and os.environ.get(
            "RANK", "0") == "0":
        print(f"mtnlg: model.preset is deprecated and goes in the next release; write model.architecture: "
              f"{raw['model']['preset']} (the same names)", file=sys.stderr)
    cfg = from_dict(raw)
    if path is not None and cfg.deepspeed_config:
        cfg = dataclasses.replace(cfg, deepspeed_config=beside(cfg.deepspeed_config, Path(path)))
    return cfg


def beside(name: str, config_path: Path) -> str:
    """A relative path of a run config (``deepspeed_config``) as written: relative to the working directory when
    it exists there, else relative to the config file's directory when it exists there (so example configs run from
    any directory)."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return name
    near = config_path.parent / p
    return str(near) if near.exists() else name


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=c`` override to a raw config dict (value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.iters=100")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = parsed


def from_dict(raw: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, raw, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for YAML/JSON next to checkpoints); a family's own model knobs sit in ``model:``
    beside the others, as the YAML states them."""
    out = dataclasses.asdict(cfg)
    model = out.get("model") if isinstance(cfg, RunConfig) else out if isinstance(cfg, ModelConfig) else None
    if model is not None:
        model.update(model.pop("family_knobs", None) or {})
    return out


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as YAML atomically (temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def _build(cls: type, raw: Any, where: str) -> Any:
    name = where or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)} - {"family_knobs"}
    kwargs = {}
    if cls is ModelConfig and "family_knobs" in raw:  # dataclasses.asdict of a config: its knobs, nested
        raw = {k: v for k, v in raw.items() if k != "family_knobs"} | dict(raw["family_knobs"] or {})
    knobs = _family_knobs(raw) if cls is ModelConfig else None
    if knobs is not None:  # the keys of the architecture's family (mtnlg.families): a section of their own
        own = {f.name for f in dataclasses.fields(knobs)}
        kwargs["family_knobs"] = _build(knobs, {k: v for k, v in raw.items() if k in own}, where)
        raw = {k: v for k, v in raw.items() if k not in own}
    for key, value in raw.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            valid = ", ".join([f.name for f in dataclasses.fields(cls) if f.name in fields]
                              + ([f.name for f in dataclasses.fields(knobs)] if knobs else []))
            raise ConfigError(f"unknown key '{full}'; valid keys in {name}: {valid}")
        kwargs[key] = _convert(hints[key], value, full)
    return cls(**kwargs)


def _family_knobs(raw: Any) -> type | None:
    """The knob dataclass of the family a raw ``model:`` section's architecture belongs to (None: it has none)."""
    arch = (raw.get("architecture") or raw.get("preset") or "gpt2") if isinstance(raw, dict) else "gpt2"
    return families.declaration(arch).knobs if arch in families.architectures() else None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} = {_show(value)} is not one of: {', '.join(map(str, choices))}")
        return value
    if tp is Architecture:
        choices = families.architectures()
        if value not in choices:
            raise ConfigError(f"{where} = {_show(value)} is not one of: {', '.join(choices)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {_show(value)}")
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{where} = {_show(value)} must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - a field type this loader does not know is a bug
        raise TypeError(f"unsupported config type {tp} at {where}")
    raise ConfigError(f"{where} must be {tp.__name__}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 60 else text


# --------------------------------------------------------------------------- resolving


def resolve(cfg: RunConfig, world_size: int) -> RunConfig:
    """Derive the dependent values for ``world_size`` ranks and check every constraint."""
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model),
        parallel=dataclasses.replace(cfg.parallel),
        train=dataclasses.replace(cfg.train),
    )
    m, par, t = cfg.model, cfg.parallel, cfg.train

    if m.vocab_size is None:
        raise ConfigError("model.vocab_size is not set and the data has no tokenizer to take it from; set it")
    _resolve_architecture(m)
    for where, value in [
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.seq_length", m.seq_length),
        ("model.vocab_size", m.vocab_size),
        ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
        ("parallel.tensor", par.tensor),
        ("parallel.pipeline", par.pipeline),
        ("train.iters", t.iters),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.log_interval", t.log_interval),
    ]:
        if value < 1:
            raise ConfigError(f"{where} = {value} must be a positive integer")
    for where, value in [("model.hidden_dropout", m.hidden_dropout), ("model.attention_dropout", m.attention_dropout)]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{where} = {value} must be in [0, 1)")

    # --- parallel layout
    tp, pp = par.tensor, par.pipeline
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline = {tp * pp}; "
            f"launch a multiple of {tp * pp} ranks or change the layout"
        )
    dp = world_size // (tp * pp)
    if par.data is not None and par.data != dp:
        raise ConfigError(
            f"parallel.data = {par.data} but world size {world_size} / (tensor {tp} * pipeline {pp}) = {dp}; "
            "remove parallel.data (it is derived) or launch a matching number of ranks"
        )
    par.data = dp
    if par.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1 (it splits the sequence over the "
                          "tensor-parallel ranks); set tensor >= 2 or turn it off")
    if par.sequence_parallel and m.seq_length % tp:
        raise ConfigError(f"parallel.sequence_parallel: model.seq_length = {m.seq_length} is not divisible by "
                          f"parallel.tensor = {tp}")

    # --- model shapes
    if m.num_layers < pp:  # stages are balanced by FLOPs and may hold different numbers of blocks
        raise ConfigError(
            f"model.num_layers = {m.num_layers} is less than parallel.pipeline = {pp}; "
            "every pipeline stage needs at least one transformer layer"
        )
    if m.kv_channels is not None and m.kv_channels < 1:
        raise ConfigError(f"model.kv_channels = {m.kv_channels} must be a positive integer (or removed)")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size = {m.hidden_size} is not divisible by "
            f"model.num_attention_heads = {m.num_attention_heads}"
        )
    if m.num_kv_heads is None:
        m.num_kv_heads = m.num_attention_heads
    if m.num_kv_heads < 1 or m.num_attention_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads = {m.num_kv_heads} must divide model.num_attention_heads = "
            f"{m.num_attention_heads} (query heads are shared in equal groups)"
        )
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads = {m.num_attention_heads} is not divisible by parallel.tensor = {tp}"
        )
    if m.num_kv_heads % tp:
        raise ConfigError(
            f"model.num_kv_heads = {m.num_kv_heads} is not divisible by parallel.tensor = {tp}; "
            "use more kv heads or a smaller tensor-parallel size"
        )
    if m.position_embedding == "rope" and m.head_dim % 2:
        raise ConfigError(f"head dim {m.head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
    if m.ffn_hidden_size is None:
        if m.activation != "swiglu":
            m.ffn_hidden_size = 4 * m.hidden_size
        else:
            m.ffn_hidden_size = _round_up(int(8 * m.hidden_size / 3), 64)
    if m.ffn_hidden_size < 1 or m.ffn_hidden_size % tp:
        raise ConfigError(
            f"model.ffn_hidden_size = {m.ffn_hidden_size} is not divisible by parallel.tensor = {tp}"
        )
    if m.position_embedding == "learned":
        if m.max_position_embeddings is None:
            m.max_position_embeddings = m.seq_length
        if m.seq_length > m.max_position_embeddings:
            raise ConfigError(
                f"model.seq_length = {m.seq_length} exceeds model.max_position_embeddings = "
                f"{m.max_position_embeddings}"
            )
    elif m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    padded = _round_up(m.vocab_size, m.make_vocab_size_divisible_by * tp)
    if m.padded_vocab_size is not None and m.padded_vocab_size != padded:
        raise ConfigError(
            f"model.padded_vocab_size = {m.padded_vocab_size} but vocab {m.vocab_size} padded to a multiple of "
            f"{m.make_vocab_size_divisible_by} * tensor {tp} is {padded}; remove it (it is derived)"
        )
    m.padded_vocab_size = padded

    # --- batch
    per_step = t.micro_batch_size * dp
    if t.global_batch_size is None:
        t.global_batch_size = per_step * (t.grad_accum_steps or 1)
    if t.global_batch_size < 1 or t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size} is not a multiple of micro_batch_size "
            f"{t.micro_batch_size} * data-parallel size {dp} = {per_step}"
        )
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise ConfigError(
            f"train.grad_accum_steps = {t.grad_accum_steps} but global_batch_size {t.global_batch_size} / "
            f"(micro_batch_size {t.micro_batch_size} * data {dp}) = {accum}; state only one of them"
        )
    t.grad_accum_steps = accum

    # --- schedule
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"need 0 <= train.min_lr ({t.min_lr}) <= train.lr ({t.lr}) and lr > 0")
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.iters
    if t.warmup_iters < 0 or t.warmup_iters > t.lr_decay_iters:
        raise ConfigError(
            f"train.warmup_iters = {t.warmup_iters} must be between 0 and lr_decay_iters = {t.lr_decay_iters}"
        )
    if t.eval_interval < 0 or t.eval_iters < 0:
        raise ConfigError("train.eval_interval and train.eval_iters must be >= 0")
    if t.max_consecutive_nonfinite < 1 or t.collective_timeout_s <= 0:
        raise ConfigError("train.max_consecutive_nonfinite must be >= 1 and train.collective_timeout_s > 0")
    if t.exit_interval < 0 or t.exit_duration_mins < 0:
        raise ConfigError("train.exit_interval and train.exit_duration_mins must be >= 0 (0: off)")

    _check_data(cfg.data)
    _check_distill(cfg.distill)
    if cfg.checkpoint.interval < 0:
        raise ConfigError(f"checkpoint.interval = {cfg.checkpoint.interval} must be >= 0")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last = {cfg.checkpoint.keep_last} must be >= 1")
    for check in families.declaration(m.architecture).checks:  # the model family's own checks
        try:
            check(m, par)
        except ValueError as e:  # families import nothing (no ConfigError there): their checks raise ValueError
            raise ConfigError(str(e)) from None
    return cfg


def _resolve_architecture(m: ModelConfig) -> None:
    """Fill the architecture's knobs that the config leaves unset (``model.preset`` is its old name)."""
    if m.preset is not None:
        if m.architecture is not None and m.architecture != m.preset:
            raise ConfigError(f"model.preset = {m.preset} and model.architecture = {m.architecture} disagree; "
                              "give model.architecture only (preset is its deprecated name)")
        m.architecture, m.preset = m.preset, None
    m.architecture = m.architecture or "gpt2"
    declared = families.declaration(m.architecture)
    if declared.knobs is not None and not isinstance(m.family_knobs, declared.knobs):
        m.family_knobs = declared.knobs()  # the family's defaults (an architecture set by --set or in Python)
    for knob, value in declared.architectures[m.architecture].items():
        if getattr(m, knob) is None:
            setattr(m, knob, value)
    if m.qkv_bias is None:
        m.qkv_bias = m.bias
    if m.activation_checkpointing is not None:  # the old switch
        if m.activation_checkpointing and m.recompute not in ("none", "full"):
            raise ConfigError(f"model.activation_checkpointing = true and model.recompute = {m.recompute} disagree; "
                              "give model.recompute only")
        if m.activation_checkpointing:
            m.recompute = "full"
        m.activation_checkpointing = None


def parse_split(split: str) -> tuple[float, float, float]:
    """'98,1,1' -> normalised (train, valid, test) fractions."""
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"data.split = {split!r} must be up to three non-negative numbers, e.g. '98,1,1'")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def _check_data(d: DataConfig) -> None:
    sources = [k for k in ("prefix", "blend", "synthetic", "sft") if getattr(d, k) is not None]
    if len(sources) > 1:
        raise ConfigError(f"data: give one of prefix, blend, synthetic or sft, not {' and '.join(sources)}")
    if d.sft is not None and d.tokenizer is None and d.vocab_file is None:
        raise ConfigError("data.sft needs the tokenizer its data was preprocessed with: set data.tokenizer")
    if d.blend is not None:
        if not d.blend:
            raise ConfigError("data.blend is empty; list at least one {prefix, weight}")
        for i, item in enumerate(d.blend):
            if item.weight <= 0:
                raise ConfigError(f"data.blend[{i}].weight = {item.weight} must be positive")
    if d.merge_file is not None and d.vocab_file is None:
        raise ConfigError("data.merge_file needs data.vocab_file (GPT-2 BPE: encoder.json + vocab.bpe); give both")
    if d.tokenizer is not None and d.vocab_file is not None:
        raise ConfigError("data: give either tokenizer (an HF directory) or vocab_file + merge_file, not both")
    if d.synthetic is not None:
        s = d.synthetic
        if s.branching < 1 or (s.vocab_size is not None and s.vocab_size < 2):
            raise ConfigError("data.synthetic needs branching >= 1 and vocab_size >= 2")
    parse_split(d.split)


def _check_distill(d: DistillConfig | None) -> None:
    if d is None:
        return
    if not d.teacher:
        raise ConfigError("distill.teacher is not set; name the teacher's checkpoint directory (an mtnlg checkpoint "
                          "or an `mtnlg import-hf` output), or remove the distill section")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature = {d.temperature} must be > 0")
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha = {d.alpha} must be in [0, 1] (the weight of the KL term)")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
