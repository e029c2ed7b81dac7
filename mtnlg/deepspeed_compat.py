"""Every place mtnlg works around or reaches into DeepSpeed, in one module: each a named function with the
DeepSpeed version it was written against and the test that pins it, so an upgrade knows what to re-check.

Knows nothing of GPT: it works on DeepSpeed engines, optimizers, checkpoints and modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mtnlg.files import temp_path

# --------------------------------------------------------------------------- engine


def skip_lone_gradient_reduction(engine) -> bool:
    """[DeepSpeed 0.19.8; pinned by tests/test_training.py::test_layout_parity (dp=1 vs dp=2)] With a single
    data-parallel rank, DeepSpeed's BF16 optimizer and plain-optimizer paths still flatten
    every gradient into one buffer, "all-reduce" it over a group of one and copy it back: three passes
    over all gradients for nothing (benchmarks/README.md). Turn that off where it is
    all the reduction does; ZeRO-2/3 and ZeRO-1's own optimizer move gradients into partitions there."""
    if engine.zero_optimization_partition_gradients():
        return False
    if engine.zero_optimization_stage() == 1 and hasattr(engine.optimizer, "reduce_gradients"):
        return False
    engine.enable_backward_allreduce = False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False
    return True


def free_last_stage_outputs(engine) -> bool:
    """[DeepSpeed 0.19.8, PipelineEngine._exec_backward_pass; pinned by tests/test_fp32_grads.py (pp=2: the last stage's
    pipe buffers after a step)] On the last pipeline stage the engine keeps each micro batch's forward output (the
    logits, (B, T, V/tp)) in its pipe buffer after that micro batch's backward, until the buffer is reused two
    micro batches later: one stale logits tensor stays alive through the next loss and its backward, the last
    stage's peak. Drop it once its backward has run (the loss's graph holds what backward needs until then)."""
    if not (hasattr(engine, "is_last_stage") and engine.is_last_stage()):
        return False
    from deepspeed.runtime.pipe import schedule

    backward = engine._INSTRUCTION_MAP[schedule.BackwardPass]

    def backward_then_free(self, buffer_id):
        backward(self, buffer_id)
        self.pipe_buffers["outputs"][buffer_id] = None

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, schedule.BackwardPass: backward_then_free}
    return True


def embedding_grads_into_fp32(engine, lookups: list) -> int:
    """[DeepSpeed 0.19.8, its BF16_Optimizer internals; pinned by tests/test_fp32_grads.py] Where DeepSpeed's BF16
    optimizer (bf16 with ZeRO 0/1) keeps an fp32 gradient for a token lookup's weight (``lookups``: modules with a
    ``weight`` and an ``fp32_grad`` slot, e.g. ``VocabParallelEmbedding``), route the lookup's gradient straight
    into it: per micro batch, no dense bf16 embedding gradient is made, added, and added again into fp32
    (benchmarks/README.md; on the first pipeline stage that was all of the tied copy's cost). The gradient is the same
    sum in fp32 without the bf16 rounding of the dense path. Returns how many were routed."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = engine.optimizer
    if not isinstance(opt, BF16_Optimizer):
        return 0
    slots = {id(p): (i, j) for i, group in enumerate(opt.bf16_groups) for j, p in enumerate(group)}
    routed = 0
    for lookup in lookups:
        if id(lookup.weight) in slots:
            lookup.fp32_grad = _Fp32GradSlot(opt, *slots[id(lookup.weight)], lookup.weight)
            routed += 1
    return routed


class _Fp32GradSlot:
    """The fp32 gradient DeepSpeed's BF16 optimizer keeps for one bf16 parameter, marked as holding a
    gradient (it then enters the norm, clipping and the dp reduction) and linked where the pipeline
    engine looks for a tied weight's gradient to all-reduce across stages."""

    def __init__(self, opt, group: int, index: int, param: torch.nn.Parameter):
        self.opt, self.group, self.index, self.param = opt, group, index, param

    def __call__(self) -> torch.Tensor:
        hp = self.opt.fp32_groups_gradients[self.group][self.index].view(self.param.shape)
        self.opt.fp32_groups_has_gradients[self.group][self.index] = True
        self.param._hp_grad = hp
        return hp


def mend_universal_load(engine, guard, group_decay: list[float], schedule, zero3: bool) -> None:
    """[DeepSpeed 0.19.8; pinned by tests/test_reshard.py] Mend three gaps of DeepSpeed's universal-checkpoint
    loading: it copies the first param group's hyperparameters onto every group (put back: no weight decay on
    biases and norms; the scheduled lr), and into ZeRO-3 it fills the fp32 master partitions without copying them
    into the model's own partitions and gives every group the same Adam step tensor."""
    for group, decay in zip(guard.param_groups, group_decay):
        group["weight_decay"] = decay
    schedule.load_state_dict(schedule.state_dict())  # re-applies the scheduled lr
    if zero3:
        opt = engine.optimizer
        for sub_group in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)
        for state in guard.state.values():  # one step tensor was shared by every group: Adam would
            if torch.is_tensor(state.get("step")):  # count each step once per group
                state["step"] = state["step"].clone()


def balanced_pipeline_module(bounds, **kwargs):
    """[DeepSpeed 0.19.8's private ``PipelineModule._partition_layers``/``_set_bounds``; pinned by
    tests/test_training.py (pp=2 parity) and tests/test_bench_kernels.py] A DeepSpeed PipelineModule whose stage
    boundaries are ``bounds`` (``stages + 1`` layer indices, e.g. balanced by FLOPs) instead of one of DeepSpeed's
    own partition methods. ``kwargs`` go to ``PipelineModule``."""
    from deepspeed.pipe import PipelineModule

    class BoundedPipelineModule(PipelineModule):
        def _partition_layers(self, method: str = "uniform") -> None:
            if method != "mtnlg:bounds":
                return super()._partition_layers(method)
            self.parts = list(bounds)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return BoundedPipelineModule(partition_method="mtnlg:bounds", **kwargs)


# --------------------------------------------------------------------------- accelerator and process group


def allow_cpu_fp16() -> None:
    """[DeepSpeed 0.19.8's CPU accelerator; pinned by tests/test_precision.py and the fp16 case of
    tests/test_training.py::test_resume_is_exact] Let DeepSpeed's CPU accelerator run fp16 on CPUs without oneDNN
    fp16 kernels.

    DeepSpeed refuses fp16 on such CPUs, yet torch computes fp16 on any CPU (slowly, by
    conversion). mtnlg installs a CPU accelerator that says so, so fp16 runs (loss scaling,
    skipped steps) can be trained and tested on any machine. Nothing changes on GPUs.
    """
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu" or get_accelerator().is_fp16_supported():
        return

    class CPUAcceleratorFP16(CPU_Accelerator):
        def is_fp16_supported(self) -> bool:
            return True

        def supported_dtypes(self) -> list:
            return [torch.float, torch.bfloat16, torch.float16]

    set_accelerator(CPUAcceleratorFP16())


def skip_shm_comm_op() -> None:
    """[DeepSpeed 0.19.8's CPU backend; pinned by tests/test_faults.py::test_a_dead_rank_ends_the_job] Keep
    DeepSpeed from building and starting its shared-memory all-reduce op on the CPU accelerator; call before
    ``deepspeed.init_distributed``.

    ``TorchBackend.__init__`` JIT-compiles ``deepspeed_shm_comm`` (a C++ build with ninja: about 2 minutes of two
    cores the first time, again whenever the build command's hash changes, e.g. between two ninja versions, and a
    killed build's lock file makes every later start wait forever) and, when every rank is on one host, creates a
    67 MB file per rank in /dev/shm that it never removes. The op serves only DeepSpeed's ``inference_all_reduce``
    (its AutoTP inference), which mtnlg never calls: training's collectives are torch.distributed's (gloo here).
    Marked incompatible, the op is skipped (``build_shm_op`` returns None; ``inference_all_reduce`` would fall back
    to torch's all-reduce). Other accelerators have no such op: nothing changes there."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --------------------------------------------------------------------------- checkpoints


def record_writes(engine) -> list[str]:
    """[DeepSpeed 0.19.8; pinned by tests/test_checkpoints.py::test_every_checkpoint_file_is_fsynced_before_the_marker]
    The paths DeepSpeed's checkpoint engine writes on this rank, recorded as it writes them (the list is cleared
    by the caller before each checkpoint): DeepSpeed writes every checkpoint file (model states, pipeline layer
    files, ZeRO optimizer partitions) through ``engine.checkpoint_engine.save(state, path)``."""
    ce = engine.checkpoint_engine
    if not hasattr(ce, "_mtnlg_written"):
        original = ce.save
        ce._mtnlg_written = []

        def save(state_dict, path, *args, **kwargs):
            out = original(state_dict, path, *args, **kwargs)
            ce._mtnlg_written.append(str(path))
            return out

        ce.save = save
    return ce._mtnlg_written


def universal_model_state_names(tag_dir: Path) -> None:
    """[DeepSpeed 0.19.8; pinned by tests/test_reshard.py (the ZeRO-3 target)] DeepSpeed looks for
    ``mp_rank_XX_model_states.pt`` when loading into ZeRO 1/2 and for
    ``zero_pp_rank_0_mp_rank_XX_model_states.pt`` into ZeRO-3; with a universal checkpoint both carry the same
    metadata (weights come from ``zero/``), so provide both names (hard links)."""
    for f in list(tag_dir.glob("mp_rank_*_model_states.pt")):
        other = tag_dir / f"zero_pp_rank_0_{f.name}"
        if not other.exists():
            os.link(f, other)
    for f in list(tag_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt")):
        other = tag_dir / f.name.removeprefix("zero_pp_rank_0_")
        if not other.exists():
            os.link(f, other)


def universal_stage3_optimizer_state(zero_dir: Path) -> None:
    """[DeepSpeed 0.19.8; pinned by tests/test_reshard.py (zero1-to-zero3)] A ZeRO-1/2 source writes its global
    optimizer state flat; DeepSpeed's ZeRO-3 universal loader reads ``optimizer_state_dict`` (the step and the
    param groups). Add that view, so a ZeRO-1/2 checkpoint also resumes under ZeRO-3."""
    import torch

    path = zero_dir / "optimizer_state.pt"
    sd = torch.load(path, weights_only=False)
    if "optimizer_state_dict" in sd:
        return
    step_file = next(zero_dir.glob("*/step.pt"), None)
    step = torch.load(step_file, weights_only=False) if step_file is not None else 0
    sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    tmp = temp_path(path)
    torch.save(sd, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- DeepSpeed's private state, read here only


def loss_scale(engine) -> float:
    """[DeepSpeed 0.19.8, ``DeepSpeedEngine._get_optimizer_loss_scale`` (private); pinned by tests/test_precision.py]
    The current dynamic loss scale of an fp16 engine."""
    return float(engine._get_optimizer_loss_scale())


def zero3_partitioned(params: list[torch.nn.Parameter]) -> int:
    """[DeepSpeed 0.19.8, ZeRO-3's ``ds_tensor``/``ds_numel``/``ds_persist`` parameter attributes; pinned by
    tests/test_training.py (ZeRO-3 partitions)] How many of ``params`` ZeRO-3 holds as a partition on this rank
    (not whole: parameters below ``stage3_param_persistence_threshold`` persist)."""
    return sum(1 for p in params if not getattr(p, "ds_persist", False) and p.ds_tensor.numel() < p.ds_numel)


def gathered_for_write(params: list[torch.nn.Parameter]):
    """ZeRO-3: a context in which ``params`` are whole and what rank 0 writes into them is partitioned back."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def set_fp32_master(param: torch.nn.Parameter, value: torch.Tensor) -> bool:
    """[DeepSpeed 0.19.8, a parameter's ``_hp_mapping`` (private) under ZeRO 1/2 and the BF16 optimizer; pinned by
    tests/test_convert_train.py (weights-only fine-tuning)] Set the optimizer's fp32 master copy of ``param`` to
    ``value`` (this rank's full tp shard); False where the optimizer keeps none through that mapping."""
    if not hasattr(param, "_hp_mapping"):
        return False
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value.float())
    return True


def set_zero3_fp32_masters(optimizer, values, dp_size: int, mixed_precision: bool) -> None:
    """[DeepSpeed 0.19.8, ZeRO-3's ``refresh_fp32_params`` and ``safe_set_full_fp32_param``; pinned by
    tests/test_convert_train.py] After module weights were written under ZeRO-3: make the fp32 masters from them
    (exact for fp32 training); with mixed precision, set each master again from ``values()`` ((parameter, fp32
    value) pairs, a second read) where the parameter's size divides by ``dp_size`` (DeepSpeed's setter cannot
    handle partition padding; the others keep masters rounded like the module weights)."""
    from deepspeed.utils import safe_set_full_fp32_param

    optimizer.refresh_fp32_params()
    if mixed_precision:
        for p, value in values():
            if p.ds_numel % dp_size == 0:
                safe_set_full_fp32_param(p, value.float())


# --------------------------------------------------------------------------- version

TESTED_DEEPSPEED = "0.19.8"  # every shim above was written against and is pinned by tests on this version


def version_warning(version: str) -> str | None:
    """One line when ``version`` is not the DeepSpeed the shims are tested on, else None."""
    if version == TESTED_DEEPSPEED:
        return None
    return (f"mtnlg: warning: DeepSpeed {version} is installed; mtnlg's DeepSpeed shims are tested on "
            f"{TESTED_DEEPSPEED} (pip install deepspeed=={TESTED_DEEPSPEED}, or run the test suite on {version})")


def warn_untested_version() -> None:
    """Print ``version_warning`` once per process (rank 0 of a launch only)."""
    import deepspeed

    line = version_warning(deepspeed.__version__)
    if line and os.environ.get("RANK", "0") == "0" and not getattr(warn_untested_version, "done", False):
        warn_untested_version.done = True
        print(line, flush=True)
