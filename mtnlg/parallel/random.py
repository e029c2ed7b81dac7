"""Tensor-parallel aware randomness, and activation checkpointing that replays it.

Two random streams, as in Megatron:
- the default torch generator, seeded the same on every tp rank of a pipeline stage: dropout
  on *replicated* activations (embeddings, residual stream) is identical across tp ranks;
- a tp stream, seeded differently per tp rank, entered with ``with rng.fork():``: dropout on
  *sharded* activations (attention probabilities of this rank's heads) differs across ranks.

``rng.checkpoint(fn, *args)`` recomputes ``fn`` in backward with both streams rewound to
where they were in forward, so dropout masks of the recomputation equal the original ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

TP_SEED_OFFSET = 2718  # Megatron's offset between the default and the tp stream
PP_SEED_STRIDE = 100  # pipeline stages get different default streams
ITERATION_STRIDE = 1_000_003  # per-iteration re-seeding


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


class TPRandom:
    """The two random streams of one rank."""

    def __init__(self, seed: int, tp_rank: int = 0, pp_rank: int = 0):
        self.default_seed = seed + PP_SEED_STRIDE * pp_rank
        self.tp_seed = seed + TP_SEED_OFFSET + tp_rank + PP_SEED_STRIDE * pp_rank
        self._tp_states: dict[torch.device, torch.Tensor] = {}
        self._iteration = 0

    def seed_default(self) -> None:
        """Seed the default generators (CPU and every device) for this rank."""
        torch.manual_seed(self.default_seed)

    def seed_iteration(self, iteration: int) -> None:
        """Re-seed both streams from (seed, iteration): a resumed run draws what an uninterrupted one would."""
        torch.manual_seed(self.default_seed + ITERATION_STRIDE * iteration)
        self._tp_states.clear()
        self._iteration = iteration

    @contextlib.contextmanager
    def fork(self, device: torch.device | str = "cpu"):
        """Run the body with the tp stream of ``device`` in place of the default one."""
        device = torch.device(device)
        if device not in self._tp_states:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.tp_seed + ITERATION_STRIDE * self._iteration)
            self._tp_states[device] = gen.get_state()
        saved = _get_state(device)
        _set_state(self._tp_states[device], device)
        try:
            yield
        finally:
            self._tp_states[device] = _get_state(device)
            _set_state(saved, device)

    def snapshot(self, device: torch.device) -> tuple:
        devices = {torch.device("cpu"), device}
        return ({d: _get_state(d) for d in devices}, dict(self._tp_states))

    def restore(self, snap: tuple) -> None:
        defaults, tp_states = snap
        for d, s in defaults.items():
            _set_state(s, d)
        self._tp_states = dict(tp_states)

    def checkpoint(self, fn: Callable, *args):
        """Activation checkpointing of ``fn(*args)``: keep only the inputs, recompute in backward."""
        return _Checkpoint.apply(fn, self, *args)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, rng, *args):
        ctx.fn, ctx.rng = fn, rng
        ctx.tensor_slots = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.device = args[ctx.tensor_slots[0]].device if ctx.tensor_slots else torch.device("cpu")
        ctx.snap = rng.snapshot(ctx.device)
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_slots])
        ctx.args = [None if torch.is_tensor(a) else a for a in args]
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_slots, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        now = ctx.rng.snapshot(ctx.device)
        ctx.rng.restore(ctx.snap)
        try:
            with torch.enable_grad():
                out = ctx.fn(*args)
        finally:
            ctx.rng.restore(now)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None) + tuple(a.grad if torch.is_tensor(a) else None for a in args)
