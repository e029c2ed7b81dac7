"""Non-finite gradients never reach the weights, and the gradient norm is known for every ZeRO stage.

DeepSpeed already skips a step whose gradient norm is inf/NaN for fp16 (loss scaling), for
bf16 (its BF16 optimizer) and for fp32 with ZeRO 1/2. It does not for fp32 with ZeRO 0 or 3,
or bf16 with ZeRO 3. The guarded optimizers (``GuardedAdamW``, ``GuardedSGD``) close that gap from
the inside: every rank checks the gradients it is about to apply, the verdict is agreed over all
ranks (one scalar all-reduce), and a step with any non-finite gradient anywhere is skipped everywhere.

With ZeRO stage 0 in fp32 DeepSpeed's own clipping miscounts under pipeline parallelism and keeps
no norm, so there the guard (``clip_with``) computes the global norm itself (``grad_norm``: every
tensor-parallel shard once, replicated parameters once, a tied embedding once across its pipeline
stages), skips the step when it is not finite, and clips.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class _Guard:
    """Mixed into a torch optimizer: skip non-finite steps everywhere; optionally compute the norm and clip."""

    def _init_guard(self) -> None:
        self.skipped = 0  # steps this guard refused
        self._clip: tuple[float, object] | None = None  # (max norm, ParallelState) when the guard clips

    def clip_with(self, max_norm: float, ps) -> None:
        """Make this optimizer compute the global gradient norm of ``ps``'s model replica and clip to ``max_norm``
        (0: no clipping). For ZeRO stage 0, where the optimizer sees the model's own parameters."""
        self._clip = (float(max_norm), ps)
        self._global_grad_norm: float | None = None  # DeepSpeed's engine reports it as its global grad norm

    def _device(self) -> torch.device:
        """Where this optimizer's parameters live (the CPU when it has none)."""
        return next((p.device for group in self.param_groups for p in group["params"]), torch.device("cpu"))

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        if self._clip is not None:
            max_norm, ps = self._clip
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            norm = grad_norm(params, ps)
            self._global_grad_norm = norm
            if not math.isfinite(norm):  # the same norm on every rank: all skip
                self.skipped += 1
                return None
            if max_norm > 0:
                coef = max_norm / (norm + 1e-6)  # DeepSpeed's formula
                if coef < 1.0:
                    torch._foreach_mul_([p.grad for p in params], coef)
            return super().step(closure)
        grads = self._grads()
        bad = _any_nonfinite(grads)
        if bad is None:  # no gradient on this rank: a verdict on the parameters' device (NCCL needs a GPU tensor)
            bad = torch.zeros(1, device=self._device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:  # one host sync per optimizer step
            self.skipped += 1
            return None
        return super().step(closure)


class GuardedAdamW(_Guard, torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._init_guard()


class GuardedSGD(_Guard, torch.optim.SGD):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._init_guard()


def grad_norm(params: list[torch.nn.Parameter], ps) -> float:
    """The L2 norm of the gradient of the whole model replica that ``params`` (this rank's, with gradients) belong
    to: tensor-parallel shards counted on every tp rank, tp-replicated parameters on tp rank 0 only, a tied weight
    once (DeepSpeed marks its copies on later pipeline stages ``ds_pipe_replicated``), summed over tp x pp."""
    mine = [p.grad for p in params
            if not getattr(p, "ds_pipe_replicated", False)
            and (ps.tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    if mine:
        total = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in mine]).square().sum()
    if ps.mp_group is not None and ps.tp_size * ps.pp_size > 1:
        dist.all_reduce(total, group=ps.mp_group)
    return float(total.sqrt())


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
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    bad = _any_nonfinite(tensors)
    bad = torch.zeros(1, device=tensors[0].device if tensors else "cpu") if bad is None else bad
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
