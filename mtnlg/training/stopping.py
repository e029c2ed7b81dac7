"""Stopping a run early without changing it: ``train.exit_interval``, ``train.exit_duration_mins``, and the
signals a cluster sends before it ends a job (SIGTERM on preemption or at the time limit; SIGUSR1 when a
scheduler is asked to warn first, e.g. SLURM's ``--signal=USR1@120``).

Every rank checks at each step boundary, and the ranks agree (one small MAX all-reduce): a signal that
reached one rank stops them all at the same iteration. The loop then saves a checkpoint and exits 0;
resuming continues the uninterrupted run exactly (the schedule still spans ``train.iters``).
"""

from __future__ import annotations

import signal
import time
import warnings

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REASONS = ("a stop signal (SIGTERM/SIGUSR1)", "train.exit_duration_mins", "train.exit_interval")


class Stopper:
    """Decides, the same on every rank, whether the run stops after the step just finished."""

    def __init__(self, exit_interval: int, exit_duration_mins: float, device: torch.device):
        self.exit_interval, self.limit_s = exit_interval, 60.0 * exit_duration_mins
        self.device = device
        self.start = time.monotonic()
        self.signalled: int | None = None
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. an embedding application): no signal handling
                if not getattr(Stopper, "warned", False):
                    Stopper.warned = True
                    warnings.warn(f"mtnlg: training runs outside the main thread, so {signal.Signals(sig).name} "
                                  "cannot stop it at a step boundary (Python delivers signals to the main thread "
                                  "only); use train.exit_interval or train.exit_duration_mins", stacklevel=2)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signum  # acted on at the next step boundary, never inside a collective

    def check(self, iteration: int) -> str | None:
        """None to continue, or why the run stops after ``iteration`` (one collective: call it on every rank)."""
        flags = torch.tensor([
            float(self.signalled is not None),
            float(self.limit_s > 0 and time.monotonic() - self.start >= self.limit_s),
            float(self.exit_interval > 0 and iteration % self.exit_interval == 0),
        ], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        hit = [reason for reason, flag in zip(REASONS, flags.tolist()) if flag > 0]
        return " and ".join(hit) if hit else None

    def close(self) -> None:
        """Put back the signal handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
