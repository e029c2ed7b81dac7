"""Predicted memory per rank: weights, gradients, optimizer states (by ZeRO stage and precision) and activations
(by micro batch, sequence, recompute choice, tensor and sequence parallelism, in-flight pipeline micro batches).

    stages = predict_memory(cfg, zero_stage=1)          # a resolved RunConfig; one entry per pipeline stage
    print(format_memory(stages))                         # what `mtnlg model-info` prints

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"): per layer and micro batch s*b*h*(34 + 5*a*s/h) bytes in 16-bit, /tp inside the tensor-parallel
regions, /tp everywhere with sequence parallelism, the 5*a*s/h term gone with selective recompute, only
the block input kept with full recompute. Here the count is made tensor by tensor for mtnlg's own blocks
(what autograd saves: GQA's narrower k and v, SwiGLU's gate and up, RoPE's rotated q and k, the attention
kernel in use), so the prediction is of this implementation, not of a generic one. Parameter counts are
read off the model (``mtnlg.model.layout``): nothing here restates the model's shapes.

Pipeline stages run 1F1B: stage i keeps min(pp - i, micro batches) micro batches' activations in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtnlg.config import ModelConfig, RunConfig
from mtnlg.model.layout import groups, stage_specs, tied_users
from mtnlg.model.registry import family

GB = 2**30


@dataclass
class StageMemory:
    """Predicted bytes on one rank of pipeline stage ``stage`` (every rank of a stage holds the same)."""

    stage: int
    layers: int  # transformer blocks on the stage
    params: int  # parameters a rank holds before ZeRO-3 partitioning (its tensor-parallel shard of the stage)
    weights: float
    gradients: float
    optimizer: float
    activations: float  # stored for backward at the peak (all in-flight micro batches; the last stage: + the loss's
    # backward working set)
    in_flight: int  # micro batches whose activations are alive at once
    buffers: float = 0.0  # DeepSpeed's gradient-reduction buckets alive during backward
    head: float = 0.0  # of ``activations``: the logits kept for the loss and the loss's backward working set
    buffers_after_head: bool = False  # the buckets exist only from a backward's first gradient (after the head's)
    after: float = 0.0  # alive at the gradient reduction and the step, once activations are freed (over the states)

    @property
    def total(self) -> float:
        """The peak, during backward or at the reduction after it. ZeRO-2 allocates its bucket at a backward's
        first gradient and frees it at the backward's end, by when the loss's backward has freed the logits and its
        working set; ZeRO-1 and 3 keep theirs until the reduction."""
        extra = max(self.head, self.buffers) if self.buffers_after_head else self.head + self.buffers
        during = self.activations - self.head + extra
        return self.weights + self.gradients + self.optimizer + max(during, self.after)


# The activation terms are the model family's (``Family.memory``; the GPT's: ``mtnlg.model.gpt_memory``, which
# documents how each is counted); these dispatch on the config's family.


def attention_kind(m: ModelConfig, precision: str, device: str = "cpu") -> str:
    """Which attention kernel the model runs ("unfused", "dropout" or "flash"): what its activations keep."""
    return family(m).memory.attention_kind(m, precision, device)


def layer_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str,
                           attention: str = "flash", device: str = "cpu") -> float:
    """Bytes one transformer block keeps for backward per micro batch on one rank (recompute ``m.recompute``)."""
    return family(m).memory.layer_activation_bytes(m, micro, tp, sp, precision, attention, device)


def embedding_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str) -> float:
    """What the first stage keeps before the blocks, per micro batch."""
    return family(m).memory.embedding_activation_bytes(m, micro, tp, sp, precision)


def head_activation_bytes(m: ModelConfig, micro: int, tp: int, sp: bool, precision: str, device: str = "cpu") -> float:
    """What the last stage keeps past the blocks (the logits included), per micro batch."""
    return family(m).memory.head_activation_bytes(m, micro, tp, sp, precision, device)


def loss_backward_bytes(m: ModelConfig, micro: int, tp: int, precision: str, device: str = "cpu",
                        sp: bool = False) -> float:
    """The last stage's working set on top of what is saved, at the loss's backward."""
    return family(m).memory.loss_backward_bytes(m, micro, tp, precision, device, sp)


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> tuple[int, int]:
    """(parameters on one rank of the stage, transformer blocks on the stage): each group of the stage's specs at
    its tensor-parallel shard size; a tied embedding counts on every stage that runs it (DeepSpeed's copies)."""
    specs = set(stage_specs(m, pp, stage))
    users = tied_users(m)
    total, blocks = 0, 0
    for g in groups(m):
        held = g.spec_index in specs
        tied_copy = not held and bool(users.get(g.prefix, frozenset()) & specs)  # a later spec running it
        if not (held or tied_copy):
            continue
        if g.name.startswith("layers."):
            blocks += 1
        for local, sharding in g.params:
            if tied_copy and local != "word_embeddings.weight":
                continue  # the last stage's copy is the word embeddings only
            total += math.prod(sharding.local_shape(tp, m.padded_vocab_size))
    return total, blocks


def stage_blocks(m: ModelConfig, pp: int, stage: int) -> list[int]:
    """Indices of the transformer blocks (``layers.<i>``) a pipeline stage holds."""
    specs = set(stage_specs(m, pp, stage))
    return sorted({int(g.name.split(".")[1]) for g in groups(m)
                   if g.spec_index in specs and g.name.startswith("layers.")})


def blocks_activation_bytes(m: ModelConfig, blocks: list[int], micro: int, tp: int, sp: bool, precision: str,
                            attention: str, device: str) -> tuple[float, float]:
    """(what the blocks ``blocks`` keep per micro batch, the most one of them keeps without recompute). A family
    whose blocks differ (T5's encoder and decoder blocks: other lengths, cross-attention) says each block's bytes
    with ``block_activation_bytes(m, index, ...)``; otherwise every block keeps ``layer_activation_bytes``."""
    mem = family(m).memory
    one = getattr(mem, "block_activation_bytes", None)
    plain = _no_recompute(m)
    if one is None:
        per = mem.layer_activation_bytes(m, micro, tp, sp, precision, attention, device)
        whole = mem.layer_activation_bytes(plain, micro, tp, sp, precision, attention, device)
        return len(blocks) * per, whole if blocks else 0.0
    kept = sum(one(m, i, micro, tp, sp, precision, attention, device) for i in blocks)
    whole = max((one(plain, i, micro, tp, sp, precision, attention, device) for i in blocks), default=0.0)
    return kept, whole


def model_state_bytes(params: float, dp: int, zero_stage: int, precision: str,
                      optimizer: str = "adamw") -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes on one rank holding ``params`` parameters (its tp shard of its
    pipeline stage), as DeepSpeed 0.19.8 keeps them through backward:

    - ZeRO-0, fp32: a torch optimizer on the model's own tensors: weights, gradients, Adam's two moments;
    - ZeRO-1/2: fp32 master partitions (a copy, also in fp32 training); ZeRO-1 keeps the module's full gradients
      (its gradient partition is made at the reduction: ``reduction_bytes``), ZeRO-2 reduces them into
      partitions as backward makes them;
    - bf16 with ZeRO 0/1 (DeepSpeed's BF16 optimizer): fp32 gradients of every parameter, fp32 master partitions;
    - ZeRO-3: weights, gradients and states all partitioned over dp.
    """
    mixed = precision != "fp32"
    low = 2 if mixed else 4
    states = 8.0 if optimizer == "adamw" else 0.0  # Adam's two moments, fp32
    part = params / dp
    if zero_stage == 0:
        return low * params, 4.0 * params, (states + (4 if mixed else 0)) * params
    master = 4.0 * part
    if zero_stage == 3:
        return low * part, low * part + (4.0 * part if mixed else 0.0), master + states * part
    if precision == "bf16":
        grads = 4.0 * params
    elif zero_stage == 2:
        grads = 4.0 * part + (low * part if mixed else 0.0)
    else:
        grads = low * params
    return low * params, grads, master + states * part


def reduction_buffer_bytes(zero: dict, dp: int, precision: str) -> float:
    """DeepSpeed's gradient-reduction buckets alive during backward on a rank (0.19.8; ``zero``: the JSON's
    ``zero_optimization``), each ``reduce_bucket_size`` elements of the gradients' dtype (5e8 by default) allocated
    whole however small the model: ZeRO-1 and 2 through DeepSpeed's ZeRO optimizer (fp32 and fp16; bf16 only at
    ZeRO-2, ZeRO-1 in bf16 runs the BF16 optimizer) at any dp, 1 included, from a backward's first gradient -- two
    with ``overlap_comm``; ZeRO-3 over dp > 1 one (measured: ``mtnlg bench``'s memory section and
    benchmarks/plan_check.py)."""
    stage = int(zero.get("stage", 0))
    if stage == 0 or (stage == 3 and dp == 1) or (stage == 1 and precision == "bf16"):
        return 0.0
    if not zero.get("contiguous_gradients", True):
        return 0.0
    count = 2 if stage in (1, 2) and zero.get("overlap_comm", False) else 1
    return count * _bucket_bytes(zero, precision)


def _bucket_bytes(zero: dict, precision: str) -> float:
    """One reduction bucket: ``reduce_bucket_size`` elements (5e8 by default) of the gradients' dtype."""
    return float(zero.get("reduce_bucket_size", 5e8)) * (4 if precision == "fp32" else 2)


def reduction_bytes(zero: dict, params: float, dp: int, pp: int, precision: str) -> float:
    """Bytes ZeRO-1 through DeepSpeed's ZeRO optimizer (fp32, fp16) holds at the gradient reduction after the last
    backward, over the module's weights, gradients and optimizer states: its buckets (under the pipeline engine
    one more, allocated by the reduction itself), or, once they are freed, the rank's fp32 gradient partition."""
    stage = int(zero.get("stage", 0))
    if stage != 1 or precision == "bf16":
        return 0.0
    buckets = reduction_buffer_bytes(zero, dp, precision)
    if pp > 1 and buckets:
        buckets += _bucket_bytes(zero, precision)
    return max(buckets, 4.0 * params / dp)


def predict_memory(cfg: RunConfig, zero_stage: int, optimizer: str = "adamw",
                   device: str = "cpu", zero: dict | None = None) -> list[StageMemory]:
    """Bytes per rank of every pipeline stage of a resolved run config trained with ``zero_stage`` (``zero``: the
    DeepSpeed JSON's ``zero_optimization`` section, for its buffer sizes; DeepSpeed's defaults without it)."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, dp = par.tensor, par.pipeline, par.data
    attention = attention_kind(m, t.precision, device)
    sp = par.sequence_parallel
    buffers = reduction_buffer_bytes({**(zero or {}), "stage": zero_stage}, dp, t.precision)
    out = []
    for stage in range(pp):
        params, blocks = stage_params(m, tp, pp, stage)
        weights, grads, opt = model_state_bytes(params, dp, zero_stage, t.precision, optimizer)
        in_flight = min(pp - stage, t.grad_accum_steps) if pp > 1 else 1
        kept, whole = blocks_activation_bytes(m, stage_blocks(m, pp, stage),
                                              t.micro_batch_size, tp, sp, t.precision, attention, device)
        acts = kept * in_flight
        if m.recompute != "none" and blocks:  # the block (full) or attention core (selective) being recomputed
            # holds its activations once more
            acts += whole if m.recompute == "full" else whole - kept / blocks
        if stage == 0:
            acts += embedding_activation_bytes(m, t.micro_batch_size, tp, sp, t.precision) * in_flight
        head = 0.0
        if stage == pp - 1:
            head = (head_activation_bytes(m, t.micro_batch_size, tp, sp, t.precision, device)
                    + loss_backward_bytes(m, t.micro_batch_size, tp, t.precision, device, sp))
        after = reduction_bytes({**(zero or {}), "stage": zero_stage}, params, dp, pp, t.precision)
        out.append(StageMemory(stage, blocks, params, weights, grads, opt, acts + head, in_flight, buffers, head,
                               buffers_after_head=zero_stage == 2, after=after))
    return out


def construction_bytes(cfg: RunConfig, zero_stage: int) -> list[float]:
    """Predicted peak bytes of building the model on one rank of each pipeline stage (``build_module``: fp32
    weights, before DeepSpeed converts or copies them): the rank's share of the weights (its tensor-parallel shards
    of its stage; under ZeRO-3 their 1/dp partition), plus what exists only while building: under ZeRO-3 the largest
    parameter's whole shard before it is partitioned (the largest layer), and the init's blocks of rows."""
    from mtnlg.parallel.layers import Init

    m, par = cfg.model, cfg.parallel
    out = []
    for stage in range(par.pipeline):
        params, _ = stage_params(m, par.tensor, par.pipeline, stage)
        specs = set(stage_specs(m, par.pipeline, stage))
        largest = max(math.prod(sh.local_shape(par.tensor, m.padded_vocab_size))
                      for g in groups(m) if g.spec_index in specs for _, sh in g.params)
        share = 4.0 * (params / par.data if zero_stage == 3 else params)
        out.append(share + (4.0 * largest if zero_stage == 3 else 0.0) + 2 * 4.0 * Init.BLOCK_ELEMENTS)
    return out


def _no_recompute(m: ModelConfig) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(m, recompute="none")


def format_memory(stages: list[StageMemory], zero_stage: int) -> str:
    """The table ``mtnlg model-info`` prints: one row per pipeline stage, GiB per rank."""
    lines = [f"predicted memory per rank (GiB; ZeRO-{zero_stage}; activations at the 1F1B peak):",
             "  stage  blocks  params/rank   weights   grads  optimizer  activations (in flight)  buffers   total"]
    for s in stages:
        lines.append(f"  {s.stage:>5}  {s.layers:>6}  {s.params / 1e6:>9.1f}M  {s.weights / GB:>8.3f}  "
                     f"{s.gradients / GB:>6.3f}  {s.optimizer / GB:>9.3f}  {s.activations / GB:>11.3f} ({s.in_flight})"
                     f"  {s.buffers / GB:>7.3f}  {s.total / GB:>7.3f}")
    return "\n".join(lines)
