"""DeepSpeed engine setup: the same model under DeepSpeed's pipeline engine (pp > 1) or its
plain engine with ZeRO 0-3 (pp = 1), and one train/eval step interface over both.

- pp > 1: the layer specs in a ``PipelineModule`` on the topology of our ParallelState,
  trained by ``PipelineEngine.train_batch`` (1F1B), TP inside each stage, ZeRO 0/1 across dp,
  tied embeddings synchronised across the first and last stage by DeepSpeed.
- pp = 1: the family's pipeline-free model (same specs, same parameter names) with our ParallelState as ``mpu``,
  so ZeRO, gradient clipping and checkpoint names see the tp groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from mtnlg.checkpoint.universal import universal_checkpoint_info
from mtnlg.config import RunConfig
from mtnlg.deepspeed_compat import (
    allow_cpu_fp16,
    embedding_grads_into_fp32,
    free_last_stage_outputs,
    loss_scale,
    mend_universal_load,
    skip_lone_gradient_reduction,
    warn_untested_version,
    zero3_partitioned,
)
from mtnlg.model.registry import family
from mtnlg.parallel import ParallelState, TPRandom
from mtnlg.parallel.distributed import deepspeed_output
from mtnlg.training.ds_config import adam_hyperparams, build_ds_config, optimizer_kind, sgd_hyperparams, zero_stage
from mtnlg.training.guard import GuardedAdamW, GuardedSGD
from mtnlg.training.pipeline import pipeline_module
from mtnlg.training.schedule import LRSchedule, param_groups

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), each (micro_batch, seq_length)


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all micro batches, all dp ranks)
    grad_norm: float | None
    skipped: bool  # fp16 overflow: no update was applied
    lr: float
    loss_scale: float | None
    distill: tuple[float, float] | None = None  # (KL, LM) terms of a distillation loss, means over the global batch
    terms: dict[str, float] | None = None  # a loss's own terms (BERT: lm_loss, sop_loss), means over the global batch


def fused_adam_supported(device: torch.device) -> bool:
    """True where torch has a fused AdamW kernel (one kernel over all tensors) for ``device``: much faster than
    the foreach path on a CPU (benchmarks/README.md)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(module: torch.nn.Module, cfg: RunConfig, ds: dict, device: torch.device):
    """The guarded optimizer the DeepSpeed JSON names (AdamW by default, or SGD), with the YAML's lr and decay."""
    groups = param_groups(module, cfg.train.weight_decay)
    if optimizer_kind(ds) == "sgd":
        return GuardedSGD(groups, lr=cfg.train.lr, **sgd_hyperparams(ds))
    return GuardedAdamW(groups, lr=cfg.train.lr, **adam_hyperparams(ds), fused=fused_adam_supported(device))


def build_module(cfg: RunConfig, ps: ParallelState, zero: int, ds_config: dict, rng: TPRandom) -> torch.nn.Module:
    """This rank's model, built shard by shard: its tensor-parallel shards of its pipeline stage, each parameter's
    values drawn block by block (``mtnlg.parallel.layers.Init``); under ZeRO-3 inside ``deepspeed.zero.Init``, so
    each parameter is partitioned over dp as soon as its layer exists. No rank ever holds the whole model."""
    show = cfg.logging.deepspeed == "info"
    seed = cfg.train.seed
    if ps.pp_size > 1:
        with deepspeed_output(show):  # DeepSpeed's PipelineModule prints its seeds and topology
            return pipeline_module(cfg.model, ps, seed, rng)
    if zero == 3:
        ds_init = {k: v for k, v in ds_config.items() if k != "optimizer"}
        with deepspeed_output(show), deepspeed.zero.Init(data_parallel_group=ps.dp_group, mpu=ps,
                                                         config_dict_or_path=ds_init):
            return family(cfg.model).model(cfg.model, ps, seed=seed, rng=rng)
    return family(cfg.model).model(cfg.model, ps, seed=seed, rng=rng)


class Engine:
    def __init__(self, cfg: RunConfig, ps: ParallelState, device: torch.device, load_universal: bool = False):
        self.cfg, self.ps, self.device = cfg, ps, device
        warn_untested_version()
        self.ds_config = build_ds_config(cfg)
        if load_universal:  # resharding a `mtnlg checkpoint reshard` output into this layout
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        if cfg.train.precision == "fp16" and device.type == "cpu":
            allow_cpu_fp16()
        self.zero_stage = zero_stage(self.ds_config)
        seed = cfg.train.seed
        self.rng = TPRandom(seed, ps.tp_rank, ps.pp_rank)
        self.pipelined = ps.pp_size > 1
        show = cfg.logging.deepspeed == "info"
        module = build_module(cfg, ps, self.zero_stage, self.ds_config, self.rng)
        self.distill = None  # the DistillLoss on the ranks computing the loss, when distilling
        if cfg.distill is not None:
            from mtnlg.training.distill import attach_teacher

            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
            self.distill = attach_teacher(module, cfg.distill, cfg.model, ps, device, dtype)
        module.universal_checkpoint_info = universal_checkpoint_info(cfg.model, ps.tp_size)

        ds_cfg = dict(self.ds_config)
        ds_cfg.pop("optimizer", None)  # built here, from the JSON's hyperparameters and the YAML's lr/decay
        optimizer = build_optimizer(module, cfg, self.ds_config, device)
        if self.zero_stage == 0 and cfg.train.precision == "fp32":  # see ds_config: mtnlg clips at stage 0
            optimizer.clip_with(cfg.train.clip_grad, ps)
        self.group_decay = [g["weight_decay"] for g in optimizer.param_groups]
        schedule = LRSchedule(optimizer, cfg.train)
        self.guard = optimizer
        with deepspeed_output(show):  # memory reports per optimizer group, ...
            self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
                model=module, optimizer=optimizer, lr_scheduler=schedule, config=ds_cfg,
                mpu=None if self.pipelined else ps,
            )
        self.module = self.engine.module
        if ps.dp_size == 1:
            skip_lone_gradient_reduction(self.engine)
        if self.pipelined:
            free_last_stage_outputs(self.engine)
        embedding_grads_into_fp32(self.engine, family(cfg.model).token_lookups(self.module))
        # a loss that keeps its terms (``term_names``, ``take_terms``: BERT's MLM and SOP) has them logged
        loss_fn = getattr(self.module, "loss_fn", None)
        self.loss_terms = loss_fn if hasattr(loss_fn, "take_terms") and cfg.distill is None else None

    def zero3_partitioned(self) -> tuple[int, int] | None:
        """(parameters ZeRO-3 partitions across dp, all parameters) on this rank; None below ZeRO-3. DeepSpeed keeps
        every parameter smaller than ``stage3_param_persistence_threshold`` whole on every rank."""
        if self.zero_stage != 3:
            return None
        params = list(self.module.parameters())
        return zero3_partitioned(params), len(params)

    def after_load(self, universal: bool) -> None:
        """After DeepSpeed's ``load_checkpoint``: mend its universal-checkpoint loading (``deepspeed_compat``)."""
        mend_universal_load(self.engine, self.guard, self.group_decay, self.schedule,
                            zero3=universal and self.zero_stage == 3)

    # ------------------------------------------------------------------ steps
    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        self.engine.train()
        skipped_before = self.skipped_steps
        lr = self.schedule.get_last_lr()[0]
        if self.cfg.distill is not None:  # the last stage runs the teacher on the input ids
            from mtnlg.training.distill import with_inputs

            micro_batches = with_inputs(micro_batches)
        if self.loss_terms is not None:
            self.loss_terms.take_terms()  # forget what evaluation added
        if self.pipelined:
            loss = float(self.engine.train_batch(iter(micro_batches)))
        else:
            total = torch.zeros((), device=self.device)
            for ids, labels in micro_batches:
                loss_t = self.engine(ids, labels)
                self.engine.backward(loss_t)
                self.engine.step()
                total += loss_t.detach().float()
            loss = self._dp_mean(total / len(micro_batches))
        norm = self.engine.get_global_grad_norm()
        return StepResult(
            loss=loss,
            grad_norm=None if norm is None else float(norm),
            skipped=self.skipped_steps > skipped_before,
            lr=lr,
            loss_scale=self.loss_scale(),
            distill=self._distill_terms() if self.cfg.distill is not None else None,
            terms=self._loss_terms() if self.loss_terms is not None else None,
        )

    def _loss_terms(self) -> dict[str, float] | None:
        """The step's loss terms averaged over the micro batches of every rank computing the loss (the last stage's;
        tp ranks hold equal copies): one all-reduce of a few numbers per step."""
        terms = self.loss_terms.take_terms().to(self.device)
        dist.all_reduce(terms)
        *sums, n = terms.tolist()
        return {name: v / n for name, v in zip(self.loss_terms.term_names, sums)} if n else None

    def _distill_terms(self) -> tuple[float, float] | None:
        """The step's KL and LM terms, averaged over the micro batches of every rank computing the loss (the last
        stage's; tp ranks hold equal copies): one all-reduce of three numbers per step, when distilling."""
        if self.distill is not None:
            terms = self.distill.take_terms().to(self.device)
        else:
            terms = torch.zeros(3, device=self.device)
        dist.all_reduce(terms)
        kl, lm, n = terms.tolist()
        return (kl / n, lm / n) if n else None

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> float:
        """Mean loss over the micro batches of every dp rank, no update."""
        if self.pipelined:
            loss = self.engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
            return float(loss)
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for ids, labels in micro_batches:
            total += self.engine(ids, labels).float()
        self.engine.train()
        return self._dp_mean(total / len(micro_batches))

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.ps.dp_size > 1:
            dist.all_reduce(value, group=self.ps.dp_group)
            value = value / self.ps.dp_size
        return float(value)

    def loss_scale(self) -> float | None:
        """The current dynamic loss scale (fp16), else None."""
        if self.cfg.train.precision != "fp16":
            return None
        return loss_scale(self.engine)

    @property
    def skipped_steps(self) -> int:
        """Steps not applied: DeepSpeed's (fp16 overflow, invalid grad norm) plus the guard's."""
        return int(self.engine.skipped_steps) + self.guard.skipped
