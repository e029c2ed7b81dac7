"""Enumerate the layouts a cluster allows for a model, predict each one's memory and step time, rank the ones
that fit.

    result = plan(base_cfg, hw, Cluster(nodes=280, gpus_per_node=8), global_batch=1920)
    result.ranked[0].layout, result.ranked[0].tflops_per_gpu, result.rejected

A layout follows Megatron's rules, as ``mtnlg.config.resolve`` checks them: tp inside a node (dividing the GPUs
of a node, the attention heads, the kv heads and the FFN; the vocabulary is padded for it), pp at most the number
of layers (stages are balanced by FLOPs, so it need not divide them), dp the rest, the global batch a multiple of
micro batch x dp; ZeRO stages as DeepSpeed takes them (``mtnlg.training.ds_config``: pp > 1 needs ZeRO 0/1, 16-bit
precision ZeRO >= 1). Memory is ``mtnlg.training.memory.predict_memory`` (largest stage); time is
``mtnlg.plan.cost.step_time``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

from mtnlg.config import ConfigError, ParallelConfig, RunConfig, resolve
from mtnlg.errors import UserError
from mtnlg.plan.cost import StepTime, step_time
from mtnlg.plan.hardware import Hardware
from mtnlg.training.ds_config import build_ds_config, load_ds_json, optimizer_kind
from mtnlg.training.memory import GB, StageMemory, predict_memory

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    micro_batch_size: int
    zero_stage: int
    sequence_parallel: bool
    recompute: str

    @property
    def family(self) -> tuple[int, int, int]:
        return self.tensor, self.pipeline, self.data

    def label(self) -> str:
        return (f"tp={self.tensor} pp={self.pipeline} dp={self.data} mb={self.micro_batch_size} zero={self.zero_stage} "
                f"sp={'on' if self.sequence_parallel else 'off'} recompute={self.recompute}")


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Choices:
    """The search space; ``None`` means every value the rules allow."""

    tensor: tuple[int, ...] | None = None
    pipeline: tuple[int, ...] | None = None
    micro_batch_size: tuple[int, ...] | None = None
    zero_stage: tuple[int, ...] | None = None
    sequence_parallel: tuple[bool, ...] | None = None
    recompute: tuple[str, ...] | None = None
    max_micro_batch_size: int = 16  # when micro batch sizes are searched: divisors of the per-replica batch up to it
    # only what mtnlg (DeepSpeed) can run; False also scores other software's settings, e.g. ZeRO-0 with fp16
    # (optimizer states replicated, as in Megatron-LM 2021), which DeepSpeed's stage-0 16-bit optimizer cannot take
    runnable_only: bool = True


@dataclass
class Scored:
    layout: Layout
    stages: list[StageMemory]
    time: StepTime
    world: int
    tokens_per_step: int
    peak_tflops: float

    @property
    def memory_bytes(self) -> float:
        return max(s.total for s in self.stages)

    @property
    def step_time_s(self) -> float:
        return self.time.total

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total

    @property
    def tflops_per_gpu(self) -> float:
        """Executed FLOPs (recompute included, as Narayanan et al. 2021 count them) per second per GPU, in TFLOP/s."""
        return self.time.hardware_flops / self.time.total / self.world / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recompute) per second over the peak of every GPU."""
        return self.time.model_flops / self.time.total / self.world / (self.peak_tflops * 1e12)

    def row(self) -> dict:
        """The ``--json`` object."""
        lay = self.layout
        return {"tensor": lay.tensor, "pipeline": lay.pipeline, "data": lay.data,
                "micro_batch_size": lay.micro_batch_size, "zero_stage": lay.zero_stage,
                "sequence_parallel": lay.sequence_parallel, "recompute": lay.recompute,
                "memory_gb": round(self.memory_bytes / GB, 3), "step_time_s": round(self.step_time_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 1), "tflops_per_gpu": round(self.tflops_per_gpu, 2),
                "mfu": round(self.mfu, 4),
                "breakdown_s": {k: round(v, 4) for k, v in self.time.breakdown().items()}}


@dataclass
class Plan:
    ranked: list[Scored]  # layouts that fit, fastest first
    rejected: dict[str, list[str]] = field(default_factory=dict)  # reason -> families ("tp=8 pp=7 dp=40")
    evaluated: int = 0  # layouts whose memory was predicted

    def best_per_family(self) -> list[Scored]:
        """The fastest layout of each (tp, pp, dp), fastest first: what the table lists."""
        seen, out = set(), []
        for s in self.ranked:
            if s.layout.family not in seen:
                seen.add(s.layout.family)
                out.append(s)
        return out

    def rank_of(self, tensor: int, pipeline: int) -> int | None:
        """1-based rank of the (tp, pp) family among ``best_per_family`` (None: no layout of it fits)."""
        for i, s in enumerate(self.best_per_family(), 1):
            if (s.layout.tensor, s.layout.pipeline) == (tensor, pipeline):
                return i
        return None


def layout_config(base: RunConfig, layout: Layout, global_batch: int) -> RunConfig:
    """``base`` with ``layout`` applied, resolved for its world size (raises ``ConfigError`` if the rules forbid it)."""
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, recompute=layout.recompute, activation_checkpointing=None,
                                  padded_vocab_size=None),
        parallel=ParallelConfig(tensor=layout.tensor, pipeline=layout.pipeline,
                                sequence_parallel=layout.sequence_parallel),
        train=dataclasses.replace(base.train, micro_batch_size=layout.micro_batch_size,
                                  global_batch_size=global_batch, grad_accum_steps=None),
    )
    return resolve(cfg, layout.tensor * layout.pipeline * layout.data)


def zero_allowed(cfg: RunConfig, stage: int) -> str | None:
    """Why DeepSpeed (as mtnlg drives it) cannot run ``cfg`` at ZeRO ``stage``; None if it can."""
    ds = load_ds_json(cfg.deepspeed_config)
    ds.setdefault("zero_optimization", {})["stage"] = stage
    try:
        build_ds_config(cfg, ds)
    except ConfigError as e:
        return str(e).split(": ", 1)[-1]
    return None


def score(base: RunConfig, hw: Hardware, cluster: Cluster, global_batch: int, layout: Layout,
          cfg: RunConfig | None = None) -> tuple[Scored, bool]:
    """Memory and time of one layout, and whether it fits in memory. ``cfg``: the resolved config, if made."""
    cfg = cfg or layout_config(base, layout, global_batch)
    device = "cpu" if hw.name == "cpu" else "cuda"
    optimizer = optimizer_kind(load_ds_json(cfg.deepspeed_config))
    stages = predict_memory(cfg, layout.zero_stage, optimizer, device)
    fits = max(s.total for s in stages) <= hw.usable_bytes
    t = step_time(cfg, hw, cluster.gpus_per_node, layout.zero_stage, stages)
    return Scored(layout, stages, t, cluster.world, global_batch * cfg.model.seq_length,
                  hw.peak_tflops(cfg.train.precision)), fits


def check_layout(base: RunConfig, hw: Hardware, cluster: Cluster, global_batch: int, layout: Layout) -> Scored:
    """Score a layout the user names (``--layout``): a rule it breaks is a ``UserError``; it may not fit."""
    if layout.tensor * layout.pipeline * layout.data != cluster.world:
        raise UserError(f"--layout: tp {layout.tensor} x pp {layout.pipeline} x dp {layout.data} != "
                        f"{cluster.world} GPUs")
    if layout.tensor > cluster.gpus_per_node or cluster.gpus_per_node % layout.tensor:
        raise UserError(f"--layout: tp={layout.tensor} must divide the {cluster.gpus_per_node} GPUs of a node")
    try:
        cfg = layout_config(base, layout, global_batch)
    except ConfigError as e:
        raise UserError(f"--layout {layout.label()}: {e}") from None
    why = zero_allowed(cfg, layout.zero_stage)
    if why:
        raise UserError(f"--layout zero={layout.zero_stage}: {why}")
    return score(base, hw, cluster, global_batch, layout, cfg)[0]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(base: RunConfig, hw: Hardware, cluster: Cluster, global_batch: int, choices: Choices = Choices()) -> Plan:
    """Every layout of ``cluster`` for ``base``'s model and ``global_batch``, scored; those that fit ranked by
    throughput (then by memory)."""
    world, per_node = cluster.world, cluster.gpus_per_node
    rejected: dict[str, list[str]] = defaultdict(list)
    ranked: list[Scored] = []
    evaluated = 0
    m = base.model
    tensors = choices.tensor or tuple(_divisors(per_node))
    for tp in tensors:
        if tp > per_node or per_node % tp or world % tp:
            rejected[f"tp must divide the {per_node} GPUs of a node and the {world} GPUs"].append(f"tp={tp}")
            continue
        pipelines = choices.pipeline or tuple(p for p in _divisors(world // tp) if p <= m.num_layers)
        for pp in pipelines:
            if world % (tp * pp):
                rejected[f"tp x pp must divide the {world} GPUs"].append(f"tp={tp} pp={pp}")
                continue
            dp = world // (tp * pp)
            family = f"tp={tp} pp={pp} dp={dp}"
            if global_batch % dp:
                rejected[f"global batch {global_batch} is not a multiple of dp"].append(family)
                continue
            micros = choices.micro_batch_size or tuple(
                b for b in _divisors(global_batch // dp) if b <= choices.max_micro_batch_size)
            micros = tuple(sorted(b for b in micros if (global_batch // dp) % b == 0))
            if not micros:
                rejected["no micro batch size divides global batch / dp"].append(family)
                continue
            sps = choices.sequence_parallel or ((False, True) if tp > 1 else (False,))
            recomputes = choices.recompute or RECOMPUTE
            probe = Layout(tp, pp, dp, micros[0], 1, False, recomputes[0])
            try:
                cfg0 = layout_config(base, probe, global_batch)
            except ConfigError as e:
                rejected[str(e)].append(family)
                continue
            zeros, why_not = [], {}
            for z in choices.zero_stage or (0, 1, 2, 3):
                why = zero_allowed(cfg0, z) if choices.runnable_only else None
                if why:
                    why_not[z] = why
                else:
                    zeros.append(z)
            if not zeros:
                rejected[next(iter(why_not.values()))].append(family)
                continue
            if not choices.zero_stage and 1 in zeros:
                zeros = [z for z in zeros if z != 0]  # ZeRO-0 does everything ZeRO-1 does with more memory
            fitted, smallest = [], None
            for z in zeros:
                for sp in sps:
                    if sp and tp == 1:
                        continue
                    for rc in recomputes:
                        for mb in micros:
                            lay = Layout(tp, pp, dp, mb, z, sp, rc)
                            try:
                                cfg = layout_config(base, lay, global_batch)
                            except ConfigError as e:
                                rejected[str(e)].append(family)
                                break
                            scored, fits = score(base, hw, cluster, global_batch, lay, cfg)
                            evaluated += 1
                            if not fits:  # a larger micro batch needs more memory still
                                if smallest is None or scored.memory_bytes < smallest.memory_bytes:
                                    smallest = scored
                                break
                            fitted.append(scored)
            if fitted:
                ranked += fitted
            elif smallest is not None:
                rejected[f"out of memory: even the smallest footprint needs more than the "
                          f"{hw.usable_bytes / GB:.1f} GiB usable"].append(
                    f"{family} ({smallest.memory_bytes / GB:.1f} GiB at mb={smallest.layout.micro_batch_size} "
                    f"zero={smallest.layout.zero_stage} recompute={smallest.layout.recompute})")
    ranked.sort(key=lambda s: (-s.tokens_per_s, s.memory_bytes))
    return Plan(ranked, dict(rejected), evaluated)
