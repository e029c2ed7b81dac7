"""The training run: every rank calls ``train(cfg)``.

Batches are addressed by global sample index: iteration ``i`` consumes samples
[i * G, (i + 1) * G) of the training stream (G = global batch), and data-parallel rank d
reads, for micro batch m, the ``micro_batch_size`` samples starting at
i * G + m * (micro * dp) + d * micro. The loss of a global batch is therefore the same for
every layout, and resuming at any iteration (under any dp size) continues the stream exactly.
Randomness (dropout) is re-seeded from (seed, iteration) at every step, so a resumed run
draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtnlg.config import RunConfig, resolve
from mtnlg.errors import TrainingAborted, UserError
from mtnlg.model.flops import describe, flops_per_token
from mtnlg.parallel import ParallelState
from mtnlg.training import checkpoint
from mtnlg.training.distributed import init_distributed, local_world_size
from mtnlg.training.engine import Batch, Engine
from mtnlg.training.guard import LossWatch, all_finite
from mtnlg.training.metrics import Metrics
from mtnlg.training.peak import total_peak_tflops
from mtnlg.training.sources import build_sources, data_tokenizer, with_vocab


@dataclass
class RunSummary:
    iterations: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> training loss
    val_losses: dict[int, float] = field(default_factory=dict)
    skipped: int = 0
    last_record: dict | None = None
    checkpoint: str | None = None


def micro_batches(source, start: int, cfg: RunConfig, ps: ParallelState, device: torch.device,
                  count: int | None = None) -> list[Batch]:
    """This dp rank's micro batches of the global batch starting at sample ``start``."""
    mbs, dp = cfg.train.micro_batch_size, ps.dp_size
    out = []
    for m in range(count or cfg.train.grad_accum_steps):
        first = start + m * mbs * dp + ps.dp_rank * mbs
        tokens = torch.from_numpy(np.stack([source[i] for i in range(first, first + mbs)]).astype(np.int64))
        out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return out


@dataclass
class LoadPlan:
    directory: str
    tag: str
    kind: str  # "native" (same layout), "universal" (from `mtnlg checkpoint reshard`), "weights" (import-hf)


def plan_load(cfg: RunConfig) -> LoadPlan | None:
    """What checkpoint.load holds and how to load it into this run's layout (checked before building engines)."""
    from mtnlg.config import load_config
    from mtnlg.convert.native import is_weights_only
    from mtnlg.training.ds_config import load_ds_json, zero_stage
    from mtnlg.training.reshard import is_universal

    load = cfg.checkpoint.load
    if not load:
        return None
    tag = checkpoint.latest_tag(load)
    if tag is None:
        if cfg.checkpoint.save and Path(load).resolve() == Path(cfg.checkpoint.save).resolve():
            return None  # resuming into the save directory: nothing saved yet
        raise UserError(f"checkpoint.load = {load} holds no complete checkpoint (no global_step*/complete)")
    tag_dir = Path(load) / tag
    if is_weights_only(tag_dir):
        return LoadPlan(load, tag, "weights")
    stage = zero_stage(load_ds_json(cfg.deepspeed_config))
    if is_universal(tag_dir):
        if stage == 0:
            raise UserError(f"{tag_dir} is a universal checkpoint; loading it needs ZeRO stage >= 1 "
                            "(ds_configs/zero1.json)")
        if stage == 3 and cfg.parallel.tensor > 1:
            raise UserError(f"DeepSpeed cannot load a universal checkpoint into ZeRO-3 with tensor parallelism "
                            f"({tag_dir}); use ZeRO-1/2 or parallel.tensor = 1")
        m = cfg.model
        if stage == 3 and m.padded_vocab_size != m.vocab_size:
            raise UserError(f"DeepSpeed's ZeRO-3 universal loader cannot re-pad the vocabulary ({m.vocab_size} -> "
                            f"{m.padded_vocab_size}); resume {tag_dir} under ZeRO-1/2, or train with a vocabulary "
                            f"size that is a multiple of {m.make_vocab_size_divisible_by} x tensor")
        return LoadPlan(load, tag, "universal")
    saved = load_config(tag_dir / checkpoint.CONFIG_NAME)
    saved_stage = zero_stage(load_ds_json(saved.deepspeed_config)) if saved.deepspeed_config else stage
    sp, p = saved.parallel, cfg.parallel
    moved = (sp.tensor, sp.pipeline) != (p.tensor, p.pipeline) or saved_stage != stage or (
        sp.data != p.data and stage > 0)
    if moved:
        raise UserError(
            f"{tag_dir} was saved with tensor={sp.tensor}, pipeline={sp.pipeline}, data={sp.data}, ZeRO-{saved_stage} "
            f"but this run is tensor={p.tensor}, pipeline={p.pipeline}, data={p.data}, ZeRO-{stage}; convert it first: "
            f"mtnlg checkpoint reshard --checkpoint {load} --output {load}-universal, then load that"
        )
    return LoadPlan(load, tag, "native")


def _load(engine: Engine, plan: LoadPlan | None) -> tuple[int, int]:
    """Load the planned checkpoint: (iteration, consumed samples) to resume from."""
    if plan is None:
        return 0, 0
    if plan.kind == "weights":  # from `mtnlg import-hf`: fine-tune from iteration 0, fresh optimizer
        from mtnlg.convert.native import load_weights

        load_weights(engine, Path(plan.directory) / plan.tag)
        return 0, 0
    _, state = engine.engine.load_checkpoint(plan.directory, tag=plan.tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if state is None:
        raise UserError(f"could not load checkpoint {plan.directory}/{plan.tag}; it is not a checkpoint of this "
                        "model/layout")
    engine.after_load(universal=plan.kind == "universal")
    return int(state["iteration"]), int(state["consumed_samples"])


def train(cfg: RunConfig) -> RunSummary:
    device = init_distributed(cfg.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = data_tokenizer(cfg)
    cfg = resolve(with_vocab(cfg, tokenizer), world)
    ps = ParallelState.create(cfg.parallel.tensor, cfg.parallel.pipeline)
    is_logger = rank == 0
    t = cfg.train
    if is_logger:
        print(describe(cfg), flush=True)

    train_src, valid_src = build_sources(cfg)
    plan = plan_load(cfg)
    engine = Engine(cfg, ps, device, load_universal=plan is not None and plan.kind == "universal")
    start_iter, consumed = _load(engine, plan)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    peak = total_peak_tflops(device, dtype, world, local_world_size(), t.peak_tflops) if is_logger else None
    metrics = Metrics(
        enabled=is_logger, save_dir=cfg.checkpoint.save, total_iters=t.iters,
        tokens_per_step=t.global_batch_size * cfg.model.seq_length,
        flops_per_token=flops_per_token(cfg.model), peak_tflops_total=peak, device=device,
        tensorboard_dir=cfg.logging.tensorboard, start_iteration=start_iter,
    )
    if start_iter:
        metrics.message(f"resumed from iteration {start_iter} ({consumed} samples consumed)")

    summary = RunSummary(iterations=start_iter)
    watch = LossWatch(t.max_consecutive_nonfinite, t.spike_factor, t.precision)
    valid_batches = None
    if valid_src is not None and t.eval_interval and t.eval_iters:
        # eval_iters global batches: the same validation samples whatever the layout
        valid_batches = micro_batches(valid_src, 0, cfg, ps, device, count=t.eval_iters * t.grad_accum_steps)
        if start_iter:  # where the loss curve resumes: the loaded model on the validation batches
            summary.val_losses[start_iter] = engine.eval_loss(valid_batches)
            metrics.message(f"iteration {start_iter}: validation loss {summary.val_losses[start_iter]:.6f} "
                            "after loading")

    for iteration in range(start_iter + 1, t.iters + 1):
        engine.rng.seed_iteration(iteration)
        batches = micro_batches(train_src, consumed, cfg, ps, device)
        t0 = time.perf_counter()
        result = engine.train_step(batches)
        seconds = time.perf_counter() - t0
        consumed += t.global_batch_size
        summary.losses[iteration] = result.loss
        val_loss = None
        if valid_batches and (iteration % t.eval_interval == 0 or iteration == t.iters):
            val_loss = engine.eval_loss(valid_batches)
            summary.val_losses[iteration] = val_loss
        downstream = None
        if cfg.eval.tasks and cfg.eval.interval and (iteration % cfg.eval.interval == 0 or iteration == t.iters):
            from mtnlg.eval.in_training import downstream_eval

            downstream = downstream_eval(engine, cfg, tokenizer)
        record = metrics.step(
            iteration, result.loss, seconds, lr=result.lr, grad_norm=result.grad_norm,
            loss_scale=result.loss_scale, skipped=engine.skipped_steps, consumed_samples=consumed,
            log=iteration % t.log_interval == 0 or iteration == t.iters or iteration == start_iter + 1,
            val_loss=val_loss, extra=downstream,
        )
        summary.last_record = record or summary.last_record
        summary.iterations = iteration
        note = watch.update(iteration, result.loss, result.grad_norm, result.skipped, result.loss_scale)
        if note:
            metrics.message(note)
        if cfg.checkpoint.save and cfg.checkpoint.interval and iteration % cfg.checkpoint.interval == 0 \
                and iteration != t.iters:
            _save(engine, cfg, iteration, consumed, rank, tokenizer)

    summary.skipped = engine.skipped_steps
    if cfg.checkpoint.save and summary.iterations > start_iter:
        path = _save(engine, cfg, summary.iterations, consumed, rank, tokenizer)
        summary.checkpoint = str(path)
        metrics.message(f"saved checkpoint {path}")
    metrics.close()
    return summary


def _save(engine: Engine, cfg: RunConfig, iteration: int, consumed: int, rank: int, tokenizer) -> Path:
    if not all_finite(engine.module):  # a safety net: the guards should make this impossible
        raise TrainingAborted(f"iteration {iteration}: the model holds non-finite weights; not saving them")
    state = {"iteration": iteration, "consumed_samples": consumed}
    return checkpoint.save(engine.engine, cfg, iteration, state, rank, tokenizer)

