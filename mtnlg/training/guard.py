"""Non-finite gradients never reach the weights.

DeepSpeed already skips a step whose gradient norm is inf/NaN for fp16 (loss scaling), for
bf16 (its BF16 optimizer) and for fp32 with ZeRO 1/2. It does not for fp32 with ZeRO 0 or 3,
or bf16 with ZeRO 3. ``GuardedAdamW`` closes that gap from the inside: every rank checks the
gradients it is about to apply, the verdict is agreed over all ranks (one scalar all-reduce),
and a step with any non-finite gradient anywhere is skipped everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class GuardedAdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.skipped = 0  # steps this guard refused

    def _local_bad(self) -> torch.Tensor | None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return _any_nonfinite(grads)

    @torch.no_grad()
    def step(self, closure=None):
        bad = self._local_bad()
        device = bad.device if bad is not None else torch.device("cpu")
        if bad is None:
            bad = torch.zeros(1, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:  # one host sync per optimizer step
            self.skipped += 1
            return None
        return super().step(closure)


class LossWatch:
    """Counts steps with a non-finite loss or gradient (stopping after too many in a row) and
    reports loss spikes against a running mean."""

    def __init__(self, max_consecutive: int, spike_factor: float, precision: str):
        self.max_consecutive, self.spike_factor, self.precision = max_consecutive, spike_factor, precision
        self.consecutive = 0
        self.mean: float | None = None
        self.seen = 0

    def update(self, iteration: int, loss: float, grad_norm: float | None, skipped: bool,
               loss_scale: float | None = None) -> str | None:
        """Record a step; returns a message to log (a spike), raises TrainingAborted when it must stop."""
        from mtnlg.errors import TrainingAborted

        if self.precision == "fp16" and loss_scale is not None and loss_scale > 1.0:
            # an overflow while the dynamic loss scale can still shrink is loss scaling at work, not a fault
            bad = not math.isfinite(loss)
        else:
            bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)) or skipped
        if bad:
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise TrainingAborted(
                    f"stopping at iteration {iteration}: {self.consecutive} steps in a row had a non-finite loss or "
                    f"gradient (loss {loss}); their updates were skipped and nothing from them is saved; lower "
                    "train.lr or check the data, then resume from the last checkpoint"
                )
            what = f"non-finite loss ({loss})" if not math.isfinite(loss) else "non-finite gradients"
            return f"iteration {iteration}: {what}; step skipped ({self.consecutive} in a row)"
        self.consecutive = 0
        message = None
        if self.mean is not None and self.seen >= 5 and loss > self.spike_factor * self.mean:
            message = (f"iteration {iteration}: loss spike {loss:.4f} > {self.spike_factor:g} x running mean "
                       f"{self.mean:.4f}")
        self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
        self.seen += 1
        return message


def _any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A (1,) float tensor, 1.0 when any element of ``tensors`` is inf or NaN; None for no tensors.

    One fp32-accumulated sum per tensor (a single read, no per-element flag tensor): NaN and inf
    propagate through a sum (inf - inf is NaN). A sum of finite values whose magnitude passes
    fp32's range (3.4e38) also counts as non-finite, which for a gradient it effectively is.
    """
    if not tensors:
        return None
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    return (~torch.isfinite(sums.sum())).float().reshape(1)


def all_finite(module: torch.nn.Module) -> bool:
    """True when every parameter on every rank is finite (ZeRO-3 shards included)."""
    bad = _any_nonfinite([getattr(p, "ds_tensor", p) for p in module.parameters()])
    bad = torch.zeros(1) if bad is None else bad
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
