"""Read an mtnlg checkpoint of any layout: full, merged, unpadded weights, one layer group at a time.

    ckpt = open_checkpoint("runs/tiny")                  # newest complete global_stepN
    for group, tensors in ckpt.iter_groups():            # "embed", "layers.0", ..., "final_norm"[, "head"]
        ...                                              # tensors: local name -> fp32, as at tp=1
    model, run_cfg, tokenizer_dir = load_native_model("runs/tiny")   # the family's model at tp=1, pp=1

The layout comes from DeepSpeed's files and ``mtnlg_config.yaml``: tensor (tp) and pipeline
(pp) sizes, data-parallel (dp) size and ZeRO stage. Weights come from

- the fp32 master weights in the optimizer partitions when the checkpoint has them (ZeRO 1-3;
  with mixed precision these are more exact than the bf16/fp16 module weights), gathered over dp
  with DeepSpeed's own bookkeeping (``param_slice_mappings`` for ZeRO 1/2 and the BF16 optimizer,
  per-parameter partitions for ZeRO-3, as ``zero_to_fp32.py`` reads them);
- else the module weights (ZeRO-0, and weights-only checkpoints from ``mtnlg import-hf``):
  ``mp_rank_XX_model_states.pt`` (pp = 1) or ``layer_LL-model_TT-model_states.pt`` (pp > 1).

Then the tp shards of each parameter are merged by its sharding (``param.sharding``, see ``mtnlg.model.layout``) and
the vocabulary padding is stripped. Files are memory-mapped and re-opened for every group, so
memory holds about one layer (not the model) whatever the checkpoint's size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mtnlg.checkpoint import ds_files
from mtnlg.checkpoint.tags import CONFIG_NAME, TOKENIZER_DIR, find_tag, is_weights_only
from mtnlg.config import ConfigError, ModelConfig, RunConfig, load_config, resolve
from mtnlg.errors import UserError
from mtnlg.model.layout import Group, groups, local_shape, sharding
from mtnlg.model.registry import family
from mtnlg.parallel.layers import shard_tensor


# DeepSpeed pickles a few of its own types next to tensors; allow exactly those (no arbitrary code).
def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_pt(path: Path) -> dict:
    """torch.load a DeepSpeed file memory-mapped (tensors read on touch), refusing arbitrary pickles."""
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except (pickle.UnpicklingError, RuntimeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UserError(f"cannot read {path}: {first[:200]}") from None


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    precision: str  # fp32 | bf16 | fp16 (of the training run)
    has_master: bool  # fp32 master partitions in optimizer files
    weights_only: bool


def _mp(pp_rank: int, tp_rank: int, tp: int) -> int:
    """DeepSpeed's model-parallel rank (pipeline-major) used in file names."""
    return pp_rank * tp + tp_rank


class NativeCheckpoint:
    """One complete checkpoint (a ``global_stepN`` directory) of any layout."""

    def __init__(self, root: Path, tag_dir: Path, iteration: int):
        self.root, self.tag_dir, self.iteration = root, tag_dir, iteration
        try:
            raw = load_config(tag_dir / CONFIG_NAME)
        except ConfigError as e:
            raise UserError(f"{tag_dir / CONFIG_NAME}: {e}") from None
        self.run_config = raw
        self.layout = self._detect_layout(raw)
        self.model_cfg: ModelConfig = resolve_model(raw, self.layout.tp, self.layout.pp, tag_dir / CONFIG_NAME)
        self.groups = groups(self.model_cfg)
        self._index: dict[str, tuple[int, dict[int, torch.Size]]] | None = None
        self._z3: dict[int, dict[str, tuple[int, int, torch.Size]]] = {}

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.root / TOKENIZER_DIR
        return d if d.is_dir() else None

    def _detect_layout(self, cfg: RunConfig) -> Layout:
        d = self.tag_dir
        zero3 = (d / ds_files.zero3_model_states(0, 0)).is_file()
        first = d / (ds_files.zero3_model_states(0, 0) if zero3 else ds_files.model_states(0))
        if not first.is_file():
            raise UserError(f"{d} has {CONFIG_NAME} but no DeepSpeed model states ({first.name}); "
                            "the checkpoint is incomplete or not an mtnlg checkpoint")
        meta = load_pt(first)
        dims = meta.get(ds_files.PARALLEL_DIMS) or {}
        tp, pp = int(dims.get("tp_degree", 1)), int(dims.get("pp_degree", 1))
        dp = int(meta.get(ds_files.DP_WORLD_SIZE) or 1)
        if (tp, pp) != (cfg.parallel.tensor, cfg.parallel.pipeline):
            raise UserError(
                f"{d}: DeepSpeed's files are tp={tp}, pp={pp} but {CONFIG_NAME} says tensor={cfg.parallel.tensor}, "
                f"pipeline={cfg.parallel.pipeline}; the directory mixes two runs"
            )
        ds = meta.get(ds_files.DS_CONFIG) or {}
        stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
        precision = next((p for p in ("bf16", "fp16") if (ds.get(p) or {}).get("enabled")), "fp32")
        has_master = any(d.glob(ds_files.optim_glob()))
        if zero3 and not has_master:
            raise UserError(f"{d}: a ZeRO-3 checkpoint without its *_{ds_files.OPTIM_SUFFIX} files cannot be read; "
                            "copy the whole global_step directory")
        return Layout(tp, pp, dp, 3 if zero3 else stage, precision, has_master, is_weights_only(d))

    # ------------------------------------------------------------------ reading

    def iter_groups(self, source: str = "auto") -> Iterator[tuple[Group, dict[str, torch.Tensor]]]:
        """(group, {local name: full unpadded fp32 tensor}) for every group, in forward order."""
        for group in self.groups:
            yield group, self.read_group(group, source)

    def read_group(self, group: Group, source: str = "auto") -> dict[str, torch.Tensor]:
        """One group's parameters merged over tp (and dp), padding stripped, as fp32.

        Shards are merged into preallocated tensors as each tp rank's are read, so memory holds
        the merged group plus one rank's shards.
        """
        merged: dict[str, torch.Tensor] = {}
        tp = self.layout.tp
        for t, shards in self.tp_shards(group, source):
            for local in group.locals:
                x = shards.pop(local)
                want = local_shape(local, self.model_cfg, tp)
                if tuple(x.shape) != want:
                    raise UserError(
                        f"{self.tag_dir}: {group.full(local)} (tp rank {t}) has shape {list(x.shape)} but "
                        f"{CONFIG_NAME} implies {list(want)}; the config does not belong to these weights"
                    )
                self._merge_into(merged, group, local, t, x)
        V = self.model_cfg.vocab_size
        return {k: (v[:V] if group.sharding(k).kind == "vocab" else v) for k, v in merged.items()}

    def tp_shards(self, group: Group, source: str = "auto") -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(tp rank, {local name: that rank's tensor, as fp32}) for every tp rank: what each rank saved (merged over
        dp), before the shards are merged."""
        src = self.source(source)
        reader = {"module": self._module_shards, "zero3": self._zero3_shards, "zero12": self._zero12_shards}[
            src if src == "module" else ("zero3" if self.layout.zero_stage == 3 else "zero12")]
        yield from reader(group)

    def source(self, source: str = "auto") -> str:
        """'master' or 'module': where weights are read from ('auto': masters when the checkpoint has them)."""
        if source == "auto":
            return "master" if self.layout.has_master else "module"
        if source == "master" and not self.layout.has_master:
            raise UserError(f"{self.tag_dir} has no optimizer files with fp32 master weights; use the module weights")
        if source == "module" and self.layout.zero_stage == 3:
            raise UserError(f"{self.tag_dir} is a ZeRO-3 checkpoint: its module files hold no weights; use the masters")
        if source not in ("master", "module"):
            raise ValueError(f"unknown weight source {source!r}")
        return source

    def _merge_into(self, merged: dict[str, torch.Tensor], group: Group, local: str, t: int,
                    x: torch.Tensor) -> None:
        """Place tp rank ``t``'s shard ``x`` of a parameter into its merged (padded) tensor."""
        rule, tp = group.sharding(local), self.layout.tp
        if rule.kind == "replicated":
            if t == 0:
                merged[local] = x.clone()  # not a view that would keep a mapped file alive
                return
            ref = merged[local]
            diff = float((x - ref).abs().max())
            if diff > 1e-3 * max(1.0, float(ref.abs().max())):
                raise UserError(f"{self.tag_dir}: the tp replicas of {group.full(local)} differ (rank {t} by "
                                f"{diff:.3g}); the checkpoint is corrupted")
            return
        d = rule.dim
        if t == 0:
            shape = list(x.shape)
            shape[d] *= tp
            merged[local] = x.new_empty(shape)
        out = merged[local]
        sizes = rule.blocks or (out.shape[d],)  # fused blocks are split separately
        src, dst = 0, 0
        for size in sizes:
            n = size // tp
            out.narrow(d, dst + t * n, n).copy_(x.narrow(d, src, n))
            src, dst = src + n, dst + size

    # --- module weights
    def _module_shards(self, group: Group) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        L = self.layout
        for t in range(L.tp):
            if L.pp > 1:  # one file per layer, keyed by local names
                sd = load_pt(self.tag_dir / ds_files.layer_states(group.spec_index, t))
                keys = {local: local for local in group.locals}
            else:
                sd = load_pt(self.tag_dir / ds_files.model_states(t)).get(ds_files.MODULE) or {}
                keys = {local: group.full(local) for local in group.locals}
            out = {}
            for local in group.locals:
                x = sd.get(keys[local])
                if x is None:
                    raise UserError(f"{self.tag_dir}: no weights for {group.full(local)} (tp rank {t}); "
                                    "the checkpoint does not match its config")
                out[local] = x.detach().float()  # fp32 files: a view of the mapped file, copied once when merged
            del sd
            yield t, out

    # --- ZeRO 1/2 and the BF16 optimizer: fp32 partitions + DeepSpeed's param_slice_mappings
    def _shapes(self) -> dict[str, tuple[int, dict[int, torch.Size]]]:
        """name -> (owning pipeline stage, {tp rank: stored shape}) from the model-states files."""
        if self._index is None:
            L = self.layout
            index: dict[str, tuple[int, dict[int, torch.Size]]] = {}
            for s in range(L.pp):
                for t in range(L.tp):
                    shapes = load_pt(self.tag_dir / ds_files.model_states(_mp(s, t, L.tp))).get(
                        ds_files.PARAM_SHAPES) or []
                    for g in shapes:
                        for n, shape in g.items():
                            stage, per_tp = index.setdefault(n, (s, {}))
                            if stage == s:  # a tied copy on a later stage is the same weight
                                per_tp[t] = shape
            self._index = index
        return self._index

    def _optim_file(self, stage: int, t: int, d: int) -> Path:
        mp = _mp(stage, t, self.layout.tp)
        found = sorted(self.tag_dir.glob(ds_files.optim_glob(d, mp)))
        if len(found) != 1:
            raise UserError(f"{self.tag_dir}: expected one optimizer file for dp rank {d}, mp rank {mp}, "
                            f"found {len(found)}; the checkpoint is incomplete")
        return found[0]

    def _zero12_shards(self, group: Group) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        L = self.layout
        fulls = {local: group.full(local) for local in group.locals}
        index = self._shapes()
        for n in fulls.values():
            if n not in index:
                raise UserError(f"{self.tag_dir}: no parameter {n} in the optimizer files; "
                                "the checkpoint does not match its config")
        stages = {local: index[n][0] for local, n in fulls.items()}
        for t in range(L.tp):
            pieces: dict[str, list[torch.Tensor]] = {local: [] for local in group.locals}
            for stage in sorted(set(stages.values())):
                mine = [local for local in group.locals if stages[local] == stage]
                for d in range(L.dp):  # each dp rank holds a contiguous fragment of each parameter
                    osd = load_pt(self._optim_file(stage, t, d))[ds_files.OPTIMIZER_STATE]
                    flat, maps = osd[ds_files.FP32_PARTITIONS], osd[ds_files.SLICE_MAPPINGS]
                    for local in mine:
                        for g, mapping in enumerate(maps):
                            frag = mapping.get(fulls[local])
                            if frag is not None:
                                pieces[local].append(flat[g].detach().narrow(0, frag.start, frag.numel).clone())
                    del osd, flat, maps
            out = {}
            for local in group.locals:
                x = torch.cat(pieces.pop(local) or [torch.empty(0)])
                shape = index[fulls[local]][1].get(t)
                if shape is None or x.numel() != math.prod(shape):
                    raise UserError(f"{self.tag_dir}: the optimizer partitions of {fulls[local]} (tp rank {t}) "
                                    "are incomplete; copy the whole checkpoint directory")
                out[local] = x.view(shape)
            yield t, out

    # --- ZeRO-3: each parameter split evenly (padded) over dp, in param_shapes order
    def _zero3_offsets(self, t: int) -> dict[str, tuple[int, int, torch.Size]]:
        if t not in self._z3:
            meta = load_pt(self.tag_dir / ds_files.zero3_model_states(0, t))
            offsets, offset = {}, 0
            for g in meta.get(ds_files.PARAM_SHAPES) or []:
                for n, shape in g.items():
                    part = math.ceil(math.prod(shape) / self.layout.dp)
                    offsets[n] = (offset, part, shape)
                    offset += part
            self._z3[t] = offsets
        return self._z3[t]

    def _zero3_shards(self, group: Group) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        L = self.layout
        for t in range(L.tp):
            offsets = self._zero3_offsets(t)
            pieces: dict[str, list[torch.Tensor]] = {local: [] for local in group.locals}
            for d in range(L.dp):
                flat = load_pt(self._optim_file(0, t, d))[ds_files.OPTIMIZER_STATE][ds_files.FP32_FLAT_GROUPS]
                bounds = [0]
                for f in flat:
                    bounds.append(bounds[-1] + f.numel())
                for local in group.locals:
                    entry = offsets.get(group.full(local))
                    if entry is None:
                        raise UserError(f"{self.tag_dir}: no parameter {group.full(local)} in the ZeRO-3 files; "
                                        "the checkpoint does not match its config")
                    start, part, _ = entry
                    g = next(i for i in range(len(flat)) if bounds[i] <= start < bounds[i + 1])
                    pieces[local].append(flat[g].detach().narrow(0, start - bounds[g], part).clone())
                del flat
            out = {}
            for local in group.locals:
                shape = offsets[group.full(local)][2]
                out[local] = torch.cat(pieces.pop(local))[: math.prod(shape)].view(shape)
            yield t, out


def resolve_model(cfg: RunConfig, tp: int, pp: int, where: Path | str) -> ModelConfig:
    """The model config of ``cfg`` resolved for tensor size ``tp`` (vocabulary padding, defaults)."""
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, padded_vocab_size=None),  # padding depends on tp
        parallel=dataclasses.replace(cfg.parallel, tensor=tp, pipeline=pp, data=None),
        train=dataclasses.replace(cfg.train, global_batch_size=None, grad_accum_steps=None),
    )
    try:
        return resolve(cfg, tp * pp).model
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None


def open_checkpoint(path: str | Path, iteration: int | None = None) -> NativeCheckpoint:
    """The complete checkpoint of ``iteration`` (default: the newest) under ``path``."""
    return NativeCheckpoint(*find_tag(path, iteration))


def full_state_dict(path: str | Path, iteration: int | None = None, source: str = "auto") -> dict[str, torch.Tensor]:
    """Every parameter, merged and unpadded, by its full (tp=1) name. Holds the whole model: small models only."""
    ckpt = open_checkpoint(path, iteration)
    return {group.full(k): v for group, tensors in ckpt.iter_groups(source) for k, v in tensors.items()}


# --------------------------------------------------------------------------- into models


def shard_for(local: str, full: torch.Tensor, cfg: ModelConfig, tp_rank: int, tp: int) -> torch.Tensor:
    """The tp-local tensor a rank holds of a full unpadded parameter (a fresh tensor)."""
    rule = sharding(local, cfg)
    if rule.kind == "replicated":
        return full.clone()
    if rule.kind == "vocab":
        padded = full.new_zeros(cfg.padded_vocab_size, *full.shape[1:])
        padded[: full.shape[0]] = full
        return padded.chunk(tp, dim=0)[tp_rank].clone()
    return shard_tensor(full, rule.dim, rule.blocks, tp_rank, tp).clone()


# model fields that change no parameter: a checkpoint trained with other values of these loads as it is
_WEIGHTLESS = {"seq_length", "padded_vocab_size", "make_vocab_size_divisible_by", "norm_eps", "hidden_dropout",
               "attention_dropout", "init_std", "recompute", "activation_checkpointing", "rope_theta", "preset"}


def check_same_model(have: ModelConfig, want: ModelConfig, where: str) -> None:
    """Refuse weights of another model: every model key that shapes or uses the weights must agree (one line naming
    the first that differs), and so must the parameters themselves (names, full shapes, shardings, read off each
    family's model)."""
    same_family = family(have).name == family(want).name
    skip = set(_WEIGHTLESS) | ({"architecture"} if same_family else set())
    if have.position_embedding != "learned" and want.position_embedding != "learned":
        skip.add("max_position_embeddings")  # the size of a table neither has
    pairs = [(f.name, getattr(have, f.name), getattr(want, f.name)) for f in dataclasses.fields(ModelConfig)
             if f.name != "family_knobs"]
    if have.family_knobs is not None and want.family_knobs is not None and same_family:  # the family's own keys
        pairs += [(f.name, getattr(have.family_knobs, f.name), getattr(want.family_knobs, f.name))
                  for f in dataclasses.fields(have.family_knobs)]
    for k, mine, theirs in pairs:
        if k not in skip and mine != theirs:
            raise UserError(
                f"{where} holds a model with model.{k} = {mine} but the run config has "
                f"{theirs}; train with that checkpoint's {CONFIG_NAME} or match model.{k}"
            )
    if [(g.name, g.params) for g in groups(have)] != [(g.name, g.params) for g in groups(want)]:
        raise UserError(f"{where} holds a model whose parameters differ from the run config's; train with that "
                        f"checkpoint's {CONFIG_NAME}")


def load_native_model(checkpoint_dir: str | Path, iteration: int | None = None, dtype: torch.dtype = torch.float32,
                      source: str = "auto"):
    """(the family's pipeline-free model at tp=1, pp=1 in eval mode, the checkpoint's RunConfig, tokenizer dir or
    None).

    Works for any layout the checkpoint was trained (or imported) with. The RunConfig is the
    one saved with the checkpoint (its training layout); ``model.cfg`` is the tp=1 model config.
    """
    from mtnlg.checkpoint.loader import load_model

    ckpt = open_checkpoint(checkpoint_dir, iteration)
    cfg = resolve(RunConfig(model=dataclasses.replace(ckpt.model_cfg, padded_vocab_size=None, recompute="none")),
                  world_size=1).model
    return load_model(ckpt, cfg, dtype=dtype, source=source), ckpt.run_config, ckpt.tokenizer_dir
