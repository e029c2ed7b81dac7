"""The task head's logits of every sample of a set, from the training engine, in any layout: each data-parallel
replica runs its share of the micro batches (the set wrapped round to whole micro batches, so every rank runs the
same number of steps); the ranks holding the head's output (the last pipeline stage, tensor rank 0) keep them, and
one all-gather gives every rank the whole set in order."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mtnlg.model.registry import family


def _to_device(x, device: torch.device):
    if isinstance(x, (tuple, list)):
        return tuple(_to_device(v, device) for v in x)
    return x.to(device)


@torch.no_grad()
def task_logits(engine, source, micro_batch_size: int) -> np.ndarray:
    """(N, ...) float32 logits of ``source``'s N samples: (N, classes), (N, choices) or (N, T, 2)."""
    ps, device = engine.ps, engine.device
    collate = family(engine.cfg.model).collate
    n, per = len(source), micro_batch_size * ps.dp_size
    mine: dict[int, np.ndarray] = {}
    for step in range(-(-n // per)):
        index = [step * per + ps.dp_rank * micro_batch_size + j for j in range(micro_batch_size)]
        inputs, labels = collate([source[i % n] for i in index])
        inputs, labels = _to_device(inputs, device), _to_device(labels, device)
        if engine.pipelined:  # the last stage gets this micro batch's head output
            _, out = engine.engine.eval_batch(iter([(inputs, labels)]), return_logits=True, num_micro_batches=1)
        else:
            engine.engine.eval()
            out = engine.engine(inputs)
        if out is not None and ps.tp_rank == 0:
            out = out.float()
            if out.dim() == 1:  # multiple choice through the pipeline: (B * C,) scores
                out = out.reshape(micro_batch_size, -1)
            for j, i in enumerate(index):
                if i < n:
                    mine[i] = out[j].cpu().numpy()
    engine.engine.train()
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        for part in parts:
            mine.update(part)
    return np.stack([mine[i] for i in range(n)])
