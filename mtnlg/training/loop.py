"""The training run: every rank calls ``train(cfg)``.

Batches are addressed by global sample index: iteration ``i`` consumes samples
[i * G, (i + 1) * G) of the training stream (G = global batch), and data-parallel rank d
reads, for micro batch m, the ``micro_batch_size`` samples starting at
i * G + m * (micro * dp) + d * micro. The loss of a global batch is therefore the same for
every layout, and resuming at any iteration (under any dp size) continues the stream exactly.
Randomness (dropout) is re-seeded from (seed, iteration) at every step, so a resumed run
draws the same masks as an uninterrupted one. The next step's micro batches are built on a
background thread while the current step runs (``Prefetcher``); the logged step time covers
the whole iteration, waiting for its batches included.

A run stops early, with a checkpoint and exit status 0, at ``train.exit_interval``, after
``train.exit_duration_mins``, or on SIGTERM/SIGUSR1 (see ``stopping``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtnlg import checkpoint
from mtnlg.checkpoint.resume import check_save_target
from mtnlg.config import RunConfig, resolve
from mtnlg.errors import JobError, TrainingAborted
from mtnlg.files import dir_problem
from mtnlg.model.flops import describe, flops_per_token
from mtnlg.model.registry import family
from mtnlg.parallel import ParallelState
from mtnlg.parallel.distributed import init_distributed, local_world_size
from mtnlg.parallel.hosts import describe_hosts, gather_hosts, gloo_interface, tp_across_hosts
from mtnlg.training.ds_config import load_ds_json, zero_stage
from mtnlg.training.engine import Batch, Engine
from mtnlg.training.guard import LossWatch, all_finite
from mtnlg.training.metrics import Metrics
from mtnlg.training.peak import total_peak_tflops
from mtnlg.training.sources import build_sources, data_tokenizer, with_vocab
from mtnlg.training.stopping import Stopper


@dataclass
class RunSummary:
    iterations: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> training loss
    grad_norms: dict[int, float | None] = field(default_factory=dict)  # iteration -> global norm before clipping
    val_losses: dict[int, float] = field(default_factory=dict)
    skipped: int = 0
    last_record: dict | None = None
    checkpoint: str | None = None
    stopped: str | None = None  # why the run stopped before train.iters (exit interval, duration, signal)
    zero3_partitioned: tuple[int, int] | None = None  # (parameters partitioned, parameters) under ZeRO-3


def micro_batches(source, start: int, cfg: RunConfig, ps: ParallelState, device: torch.device,
                  count: int | None = None) -> list[Batch]:
    """This dp rank's micro batches of the global batch starting at sample ``start``."""
    mbs, dp = cfg.train.micro_batch_size, ps.dp_size
    if getattr(source, "sft", False):
        from mtnlg.training.sft_batches import sft_micro_batches

        return sft_micro_batches(source, start, mbs, ps.dp_rank, dp, device, count or cfg.train.grad_accum_steps)
    out = []
    fam = family(cfg.model)
    for m in range(count or cfg.train.grad_accum_steps):
        first = start + m * mbs * dp + ps.dp_rank * mbs
        samples = [source[i] for i in range(first, first + mbs)]
        if fam.collate is not None:  # a family's own samples (e.g. BERT's sentence pairs)
            inputs, labels = fam.collate(samples)
        else:  # token windows: the family's micro_batch (a GPT shifts by one)
            inputs, labels = fam.micro_batch(torch.from_numpy(np.stack(samples).astype(np.int64)))
        out.append((_to_device(inputs, device), _to_device(labels, device)))
    return out


def _to_device(x, device: torch.device):
    """A tensor, or a tuple of tensors (and Nones), on ``device``."""
    if isinstance(x, (tuple, list)):
        return tuple(_to_device(v, device) for v in x)
    return x.to(device) if isinstance(x, torch.Tensor) else x


class Prefetcher:
    """This rank's micro batches of iterations ``first``, ``first + 1``, ..., ``last``, each built on a background
    thread while the step before it runs (one iteration ahead)."""

    def __init__(self, source, cfg: RunConfig, ps: ParallelState, device: torch.device, first: int, last: int,
                 consumed: int):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._args = (source, cfg, ps, device)
        self._thread = threading.Thread(target=self._fill, args=(first, last, consumed), daemon=True,
                                        name="mtnlg-prefetch")
        self._stop = threading.Event()
        self._thread.start()

    def _fill(self, first: int, last: int, consumed: int) -> None:
        source, cfg, ps, device = self._args
        for _ in range(first, last + 1):
            try:
                item = micro_batches(source, consumed, cfg, ps, device)
            except BaseException as e:  # handed to the training thread, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return
            consumed += cfg.train.global_batch_size

    def next(self) -> list[Batch]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def fine_tune_from(cfg: RunConfig) -> bool:
    """Whether checkpoint.load is loaded as weights only (fresh optimizer and schedule): fine-tuning
    (``data.sft.fresh_optimizer``) from a checkpoint that is not this run's own ``checkpoint.save``."""
    sft, c = cfg.data.sft, cfg.checkpoint
    if sft is None or not sft.fresh_optimizer or not c.load:
        return False
    return not (c.save and Path(c.load).resolve() == Path(c.save).resolve())


def _check_save_dir(cfg: RunConfig) -> None:
    """Before anything is built: checkpoint.save must be a directory this run can write."""
    save, t = cfg.checkpoint.save, cfg.train
    if not save:
        for key, value in (("exit_interval", t.exit_interval), ("exit_duration_mins", t.exit_duration_mins)):
            if value:
                raise JobError(f"train.{key} = {value} stops the run early to be resumed, but checkpoint.save is "
                               "not set, so nothing would be saved; set checkpoint.save=DIR")
        return
    if Path(save).exists() and not Path(save).is_dir():
        raise JobError(f"checkpoint.save = {save} is an existing file; name a directory for the checkpoints")
    problem = dir_problem(save)
    if problem:
        raise JobError(f"checkpoint.save = {save}: {problem}; name a directory you can write")


def deterministic_algorithms(device: torch.device) -> None:
    """``train.deterministic``: torch's deterministic kernels (an error where none exists), and what CUDA needs
    for them (cuBLAS workspace config, no cuDNN autotuning)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def train(cfg: RunConfig) -> RunSummary:
    show_ds = cfg.logging.deepspeed == "info"
    device = init_distributed(cfg.train.collective_timeout_s, show_deepspeed=show_ds)
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = data_tokenizer(cfg)
    cfg = resolve(with_vocab(cfg, tokenizer), world)
    _check_save_dir(cfg)
    check_save_target(cfg)
    if cfg.train.deterministic:
        deterministic_algorithms(device)
    ps = ParallelState.create(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.sequence_parallel)
    hosts = gather_hosts()
    is_logger = rank == 0
    t = cfg.train
    if is_logger:
        print(describe(cfg), flush=True)
        if len({h.hostname for h in hosts}) > 1:
            iface = gloo_interface() if device.type == "cpu" else None
            print(f"hosts: {describe_hosts(hosts)}" + (f"; gloo over {iface}" if iface else ""), flush=True)
        warning = tp_across_hosts(hosts, ps.dims.groups("tp"))
        if warning:
            print(warning, flush=True)

    train_src, valid_src = build_sources(cfg)
    plan = checkpoint.plan_load(cfg, zero_stage(load_ds_json(cfg.deepspeed_config)), ps, fine_tune_from(cfg))
    engine = Engine(cfg, ps, device, load_universal=plan is not None and plan.kind == "universal")
    start_iter, consumed = checkpoint.load(engine, plan)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    peak = total_peak_tflops(device, dtype, world, local_world_size(), t.peak_tflops) if is_logger else None
    metrics = Metrics(
        enabled=is_logger, save_dir=cfg.checkpoint.save, total_iters=t.iters,
        tokens_per_step=t.global_batch_size * cfg.model.seq_length,
        flops_per_token=flops_per_token(cfg.model), peak_tflops_total=peak, device=device,
        tensorboard_dir=cfg.logging.tensorboard, start_iteration=start_iter,
    )
    summary = RunSummary(iterations=start_iter, zero3_partitioned=engine.zero3_partitioned())
    if summary.zero3_partitioned:
        split, total = summary.zero3_partitioned
        metrics.message(f"ZeRO-3: {split} of {total} parameter tensors partitioned over {ps.dp_size} data-parallel "
                        "ranks (the rest are under stage3_param_persistence_threshold and stay whole on every rank)")
    if cfg.distill is not None:  # every rank has read the teacher's checkpoint; the last stage holds it
        d = cfg.distill
        metrics.message(f"distill: teacher {d.teacher} loaded; loss = {d.alpha:g} * {d.temperature:g}^2 * KL(teacher "
                        f"|| student) + {1 - d.alpha:g} * LM")
    if start_iter:
        metrics.message(f"resumed from iteration {start_iter} ({consumed} samples consumed)")
        note = _schedule_change(plan, cfg)
        if note:
            metrics.message(note)

    watch = LossWatch(t.max_consecutive_nonfinite, t.spike_factor, t.precision)
    valid_batches = None
    if valid_src is not None and t.eval_interval and t.eval_iters:
        # eval_iters global batches: the same validation samples whatever the layout
        valid_batches = micro_batches(valid_src, 0, cfg, ps, device, count=t.eval_iters * t.grad_accum_steps)
        if start_iter:  # where the loss curve resumes: the loaded model on the validation batches
            summary.val_losses[start_iter] = engine.eval_loss(valid_batches)
            metrics.message(f"iteration {start_iter}: validation loss {summary.val_losses[start_iter]:.6f} "
                            "after loading")

    stopper = Stopper(t.exit_interval, t.exit_duration_mins, device)
    batches = Prefetcher(train_src, cfg, ps, device, start_iter + 1, t.iters, consumed)
    try:
        for iteration in range(start_iter + 1, t.iters + 1):
            t0 = time.perf_counter()
            engine.rng.seed_iteration(iteration)
            result = engine.train_step(batches.next())
            seconds = time.perf_counter() - t0
            consumed += t.global_batch_size
            summary.losses[iteration] = result.loss
            summary.grad_norms[iteration] = result.grad_norm
            val_loss = None
            if valid_batches and (iteration % t.eval_interval == 0 or iteration == t.iters):
                val_loss = engine.eval_loss(valid_batches)
                summary.val_losses[iteration] = val_loss
            downstream = None
            if cfg.eval.tasks and cfg.eval.interval and (iteration % cfg.eval.interval == 0 or iteration == t.iters):
                from mtnlg.eval.in_training import downstream_eval

                downstream = downstream_eval(engine, cfg, tokenizer)
            stop = stopper.check(iteration) if iteration < t.iters else None
            record = metrics.step(
                iteration, result.loss, seconds, lr=result.lr, grad_norm=result.grad_norm,
                loss_scale=result.loss_scale, skipped=engine.skipped_steps, consumed_samples=consumed,
                log=iteration % t.log_interval == 0 or iteration == t.iters or iteration == start_iter + 1
                or stop is not None, val_loss=val_loss, extra=downstream, distill=result.distill, terms=result.terms,
            )
            summary.last_record = record or summary.last_record
            summary.iterations = iteration
            note = watch.update(iteration, result.loss, result.grad_norm, result.skipped, result.loss_scale)
            if note:
                metrics.message(note)
            if stop is not None:
                summary.stopped = stop
                metrics.message(f"stopping after iteration {iteration} of {t.iters}: {stop}")
                break
            if cfg.checkpoint.save and cfg.checkpoint.interval and iteration % cfg.checkpoint.interval == 0 \
                    and iteration != t.iters:
                metrics.message(f"saved checkpoint {_save(engine, cfg, iteration, consumed, rank, tokenizer)}")
    finally:
        batches.close()
        stopper.close()

    summary.skipped = engine.skipped_steps
    if cfg.checkpoint.save and summary.iterations > start_iter:
        path = _save(engine, cfg, summary.iterations, consumed, rank, tokenizer)
        summary.checkpoint = str(path)
        metrics.message(f"saved checkpoint {path}")
        if summary.stopped:
            metrics.message(f"resume with checkpoint.load={cfg.checkpoint.save} to go on to iteration {t.iters}")
    elif summary.stopped:
        metrics.message("checkpoint.save is not set: nothing was saved")
    metrics.close()
    return summary


def _schedule_change(plan, cfg: RunConfig) -> str | None:
    """A line when the resumed run's learning-rate schedule differs from the one the checkpoint was trained under
    (another train.iters moves the decay's end: the lr differs from the uninterrupted run's from here on)."""
    from mtnlg.checkpoint.tags import CONFIG_NAME
    from mtnlg.config import load_config

    path = Path(plan.directory) / plan.tag / CONFIG_NAME if plan is not None and plan.kind != "weights" else None
    if path is None or not path.is_file():
        return None
    old, new = load_config(path).train, cfg.train
    before = old.lr_decay_iters or old.iters
    if before == new.lr_decay_iters:
        return None
    return (f"note: the learning-rate schedule now decays over {new.lr_decay_iters} iterations, not the "
            f"checkpoint's {before} (train.iters is {new.iters}, was {old.iters}); set train.lr_decay_iters={before} "
            "to continue the original schedule")


def _save(engine: Engine, cfg: RunConfig, iteration: int, consumed: int, rank: int, tokenizer) -> Path:
    if not all_finite(engine.module):  # a safety net: the guards should make this impossible
        raise TrainingAborted(f"iteration {iteration}: the model holds non-finite weights; not saving them")
    state = {"iteration": iteration, "consumed_samples": consumed}
    return checkpoint.save(engine.engine, cfg, iteration, state, rank, tokenizer)
