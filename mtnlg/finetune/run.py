"""The fine-tuning run (every rank calls ``finetune``), as Megatron-LM's ``tasks/main.py`` does it:

- the task picks the model's head (``model.head``: classify with the task's class count, multiple_choice, span);
- the run trains ``epochs`` passes over the training set, ``len(train) // train.global_batch_size`` steps each
  (the last partial batch of an epoch dropped), the samples shuffled per epoch by ``train.seed`` (the same order
  in every layout); ``train.iters`` is derived from them, the learning rate (``train.lr``, ``warmup_iters``,
  ``lr_decay``, ``min_lr``, ``weight_decay``) and batch sizes are the config's;
- after every epoch each validation set is scored with the task's metrics and ``<checkpoint.save>/task_results.json``
  is rewritten (temp file, then rename); the final model is saved as a checkpoint (``export-hf``, ``evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.distributed as dist

from mtnlg import checkpoint
from mtnlg.checkpoint.resume import check_save_target
from mtnlg.config import RunConfig, resolve
from mtnlg.errors import UserError
from mtnlg.files import write_atomic
from mtnlg.finetune.predict import task_logits
from mtnlg.finetune.weights import check_pretrained, is_task_model, load_pretrained, open_pretrained
from mtnlg.model.flops import flops_per_token
from mtnlg.parallel import ParallelState
from mtnlg.parallel.distributed import init_distributed
from mtnlg.tasks.data import TaskData, load_task_data
from mtnlg.tasks.registry import get_task
from mtnlg.tasks.scoring import score
from mtnlg.training.engine import Engine
from mtnlg.training.loop import micro_batches
from mtnlg.training.metrics import Metrics
from mtnlg.training.sources import data_tokenizer, with_vocab

RESULTS = "task_results.json"


class EpochShuffle:
    """Global sample g of the run -> a training sample: epoch g // per_epoch reads the set in its own order (a
    permutation drawn from (seed, epoch)), so every layout and dp size sees the same batches."""

    def __init__(self, source, per_epoch: int, seed: int):
        self.source, self.per_epoch, self.seed = source, per_epoch, seed
        self._order: tuple[int, np.ndarray] | None = None

    def __getitem__(self, g: int):
        epoch, i = divmod(g, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
        return self.source[int(self._order[1][i])]


def task_config(cfg: RunConfig, task_name: str, labels: Sequence[str] | None, n_train: int, epochs: int,
                world: int) -> tuple[RunConfig, int]:
    """The run config with the task's head and the epochs' iterations, resolved; and the steps per epoch."""
    task = get_task(task_name)
    knobs = dataclasses.replace(cfg.model.family_knobs, head=task.kind,
                                num_classes=len(labels) if labels else cfg.model.family_knobs.num_classes)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, family_knobs=knobs))
    batch = resolve(cfg, world).train.global_batch_size
    per_epoch = n_train // batch
    if per_epoch < 1:
        raise UserError(f"the training set has {n_train} samples, fewer than train.global_batch_size = {batch}; "
                        "lower the batch size or give more training data")
    t = dataclasses.replace(cfg.train, iters=epochs * per_epoch, lr_decay_iters=None, eval_interval=0)
    return resolve(dataclasses.replace(cfg, train=t), world), per_epoch


def finetune(cfg: RunConfig, task_name: str, train_path: str, valid_paths: Sequence[str], pretrained: str | None,
             epochs: int, doc_stride: int = 128) -> dict:
    """Fine-tune and evaluate (see the module doc); returns what task_results.json holds."""
    from mtnlg.data.tokenizer import load_tokenizer

    get_task(task_name)  # every check that needs no peers first: a bad input writes nothing
    if not is_task_model(cfg.model):
        raise UserError(f"model.architecture = {cfg.model.architecture} is not a BERT encoder; --task {task_name} "
                        "fine-tunes megatron_bert or bert (docs/bert.md)")
    if epochs < 1:
        raise UserError(f"--epochs {epochs} must be >= 1")
    if not cfg.checkpoint.save:
        raise UserError(f"set checkpoint.save: the fine-tuned model and {RESULTS} are written there")
    ckpt = None
    if pretrained:
        ckpt = open_pretrained(pretrained)
        if not is_task_model(ckpt.model_cfg):
            check_pretrained(ckpt, cfg.model, f"--pretrained {pretrained}")  # raises: another family
        if ckpt.tokenizer_dir is None:
            raise UserError(f"--pretrained {pretrained} has no tokenizer/ directory; the task's text needs the "
                            "tokenizer the model was trained with")
        tokenizer = load_tokenizer(str(ckpt.tokenizer_dir))
    else:
        tokenizer = data_tokenizer(cfg)
    data = load_task_data(task_name, train_path, valid_paths, tokenizer, cfg.model.seq_length, doc_stride)

    device = init_distributed(cfg.train.collective_timeout_s, show_deepspeed=cfg.logging.deepspeed == "info")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, per_epoch = task_config(with_vocab(cfg, tokenizer), task_name, data.labels, len(data.train), epochs, world)
    if ckpt is not None:
        check_pretrained(ckpt, cfg.model, f"--pretrained {pretrained}")
    check_save_target(cfg)
    if rank == 0:  # task_results.json is written there after the first epoch, before any checkpoint
        Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
    ps = ParallelState.create(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.sequence_parallel)
    engine = Engine(cfg, ps, device)
    t = cfg.train
    metrics = Metrics(enabled=rank == 0, save_dir=cfg.checkpoint.save, total_iters=t.iters,
                      tokens_per_step=t.global_batch_size * cfg.model.seq_length,
                      flops_per_token=flops_per_token(cfg.model), peak_tflops_total=None, device=device)
    if ckpt is not None:
        _, fresh = load_pretrained(engine, ckpt)
        metrics.message(f"finetune: encoder from {pretrained} ({ckpt.model_cfg.family_knobs.head} heads dropped); "
                        f"initialised fresh: {', '.join(fresh) or 'nothing'}")
    else:
        metrics.message("finetune: no --pretrained: every weight is randomly initialised")
    metrics.message(f"finetune: {task_name}, {len(data.train)} training samples, {epochs} epochs x {per_epoch} "
                    f"steps of {t.global_batch_size}; validation: {', '.join(v.path for v in data.valid)}")

    train = EpochShuffle(data.train, per_epoch * t.global_batch_size, t.seed)
    results = {"task": task_name, "labels": list(data.labels) if data.labels else None,
               "pretrained": pretrained, "train_data": str(train_path), "epochs": []}
    iteration = consumed = 0
    try:
        for epoch in range(1, epochs + 1):
            losses = []
            for _ in range(per_epoch):
                iteration += 1
                t0 = time.perf_counter()
                engine.rng.seed_iteration(iteration)
                result = engine.train_step(micro_batches(train, consumed, cfg, ps, device))
                consumed += t.global_batch_size
                losses.append(result.loss)
                metrics.step(iteration, result.loss, time.perf_counter() - t0, lr=result.lr,
                             grad_norm=result.grad_norm, loss_scale=result.loss_scale, skipped=engine.skipped_steps,
                             consumed_samples=consumed, log=iteration % t.log_interval == 0 or iteration == t.iters)
            record = {"epoch": epoch, "iteration": iteration, "train_loss": float(np.mean(losses)),
                      "valid": evaluate_sets(engine, data, t.micro_batch_size)}
            results["epochs"].append(record)
            for path, m in record["valid"].items():
                metrics.message(f"epoch {epoch}: {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
            if rank == 0:
                write_atomic(Path(cfg.checkpoint.save) / RESULTS, json.dumps(results, indent=2) + "\n")
        path = checkpoint.save(engine.engine, cfg, iteration, {"iteration": iteration, "consumed_samples": consumed},
                               rank, tokenizer)
        metrics.message(f"saved checkpoint {path}; results in {Path(cfg.checkpoint.save) / RESULTS}")
    finally:
        metrics.close()
    return results


def evaluate_sets(engine, data: TaskData, micro_batch_size: int) -> dict[str, dict[str, float]]:
    """Each validation set's metrics (every rank gets them)."""
    out = {}
    for v in data.valid:
        logits = task_logits(engine, v.source, micro_batch_size)
        out[v.path], _ = score(data.task, v.examples, v.features, logits, data.labels)
    return out
