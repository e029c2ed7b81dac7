"""Learning-rate schedule (linear warmup, then cosine/linear decay to min_lr) and AdamW param groups."""

from __future__ import annotations

import math

from torch import nn

from mtnlg.config import TrainConfig


def lr_at(t: TrainConfig, step: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based)."""
    if t.warmup_iters and step < t.warmup_iters:
        return t.lr * (step + 1) / t.warmup_iters
    if t.lr_decay == "constant":
        return t.lr
    span = max(t.lr_decay_iters - t.warmup_iters, 1)
    ratio = min(max(step - t.warmup_iters, 0) / span, 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if t.lr_decay == "cosine" else 1.0 - ratio
    return t.min_lr + coeff * (t.lr - t.min_lr)


class LRSchedule:
    """Sets the optimizer's lr before every step; DeepSpeed calls ``step()`` after each applied update
    and saves/restores ``state_dict()`` with its checkpoints."""

    def __init__(self, optimizer, train: TrainConfig):
        self.optimizer, self.train = optimizer, train
        self.steps = 0
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.train, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [lr_at(self.train, self.steps)]

    def step(self, increment: int = 1, **_) -> None:
        self.steps += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._apply()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 parameter's own shape is its partition's: ds_shape is the parameter's
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
