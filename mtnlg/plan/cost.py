"""Predicted step time of one layout: compute, recompute, pipeline bubble and communication, term by term.

    t = step_time(cfg, hw, gpus_per_node, zero_stage, stages)   # cfg resolved for the layout; stages: predict_memory
    t.total, t.breakdown()

One training step of mtnlg (DeepSpeed's 1F1B pipeline engine, Megatron tensor parallelism, ZeRO data
parallelism) costs, on the pipeline stage that paces the others:

- GEMMs: the stage's forward FLOPs (``mtnlg.model.layout.spec_flops``, split over tp) x 3 for forward and
  backward, plus the recomputed forward (full: every block again; selective: the attention core, the part of a
  block's FLOPs that grows with the sequence), at ``hw.gemm_efficiency`` of the peak;
- memory-bound kernels (norms, activations, softmax, dropout, residuals): the bytes each block keeps for backward
  (``mtnlg.training.memory.layer_activation_bytes``, with nothing recomputed) moved ``TRAFFIC_FWD`` times in
  forward and ``TRAFFIC_BWD`` times in backward (again in forward when recomputed), at the memory bandwidth;
- tensor-parallel collectives of every block: 2 all-reduces of the (B, T, h) activation in forward, 2 in
  backward, 2 more when the forward is recomputed; with sequence parallelism the all-gathers and
  reduce-scatters that replace them (and the all-gathers that re-gather the kept sequence shards in backward);
- pipeline: the stages' times once (fill and drain) plus (m - 1) times the slowest one, i.e. the bubble
  (pp - 1) / m for equal stages, and per micro batch the activation sent forward and its gradient sent back;
- data parallelism, after the last micro batch (not overlapped; across nodes over as many links as the group has
  ranks on a node: ``dp_rails``): ZeRO-0 all-reduces the gradients, ZeRO-1
  reduces them (an all-reduce of fp32 gradients with bf16, a reduce-scatter otherwise) and all-gathers the
  updated weights, ZeRO-2 reduce-scatters at every micro batch, ZeRO-3 also all-gathers the weights before every
  forward and backward;
- the optimizer step: ``OPTIMIZER_BYTES`` per parameter a rank updates, at the memory bandwidth.

Collectives follow the ring model: an all-reduce of n bytes over p ranks moves 2 (p - 1) / p n bytes per rank and
takes 2 (p - 1) latency steps; an all-gather or reduce-scatter half of that. A group inside one node uses the
intra-node bandwidth, one that spans nodes the inter-node one (rank placement: DeepSpeed's topology, tp fastest,
then dp, then pp).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mtnlg.config import RunConfig
from mtnlg.model.layout import block_anchors, spec_flops, stage_bounds
from mtnlg.plan.hardware import Hardware
from mtnlg.training.memory import (
    StageMemory,
    attention_kind,
    embedding_activation_bytes,
    head_activation_bytes,
    layer_activation_bytes,
)

TRAFFIC_FWD = 2.0  # forward: every kept tensor written once and read once by the next kernel
TRAFFIC_BWD = 3.0  # backward: kept tensors read, incoming gradients read, outgoing gradients written
OPTIMIZER_BYTES = 36.0  # Adam: read gradient, master weight, two moments; write them and the 16-bit copy; norm


@dataclass
class StepTime:
    """Seconds of one global batch on the slowest pipeline stage, by cause."""

    compute: float  # GEMMs of forward and backward (bubble excluded)
    recompute: float  # GEMMs of the recomputed forward
    memory_bound: float  # elementwise kernels
    tp_comm: float  # tensor-parallel collectives
    p2p: float  # activations and gradients between pipeline stages
    bubble: float  # pipeline fill and drain
    dp_comm: float  # data-parallel gradient reduction and weight gathering
    optimizer: float
    hardware_flops: float  # FLOPs the step executes, all ranks (recompute included: Narayanan et al.'s count)
    model_flops: float  # FLOPs of the model (no recompute): the numerator of MFU

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + self.memory_bound + self.tp_comm + self.p2p + self.bubble
                + self.dp_comm + self.optimizer)

    def breakdown(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.endswith("flops")}


def ring_time(kind: str, nbytes: float, ranks: int, bandwidth: float, latency_s: float,
              slowdown: float = 1.0) -> float:
    """Seconds of a ring collective (``all_reduce``, ``all_gather``, ``reduce_scatter``) of ``nbytes`` (the full
    tensor) over ``ranks`` ranks; one message for ``p2p``. ``slowdown``: all-gathers and reduce-scatters take
    that much longer per byte than an all-reduce (measured for gloo; 1 for NCCL)."""
    if kind == "p2p":
        return latency_s + nbytes / bandwidth
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1
    per_byte = 1.0 if kind == "all_reduce" else slowdown
    return steps * latency_s + steps / ranks * nbytes * per_byte / bandwidth


def spans_nodes(tp: int, pp: int, dp: int, gpus_per_node: int, axis: str) -> bool:
    """Whether some group along ``axis`` ('tp', 'dp', 'pp') holds ranks of two nodes, ranks numbered node by node
    (``gpus_per_node`` each) in DeepSpeed's order (``ParallelDims``: tp fastest, then dp, then pp): stage i holds
    the block of ranks [i tp dp, (i + 1) tp dp); a dp group lies inside its stage's block, a pp message goes from
    one block to the next."""
    block, node = tp * dp, gpus_per_node
    if axis == "tp":
        return (tp - 1) // node > 0 or any(r // node != (r + tp - 1) // node for r in range(0, block * pp, tp))
    if axis == "dp":
        return dp > 1 and any(i * block // node != ((i + 1) * block - 1) // node for i in range(pp))
    return any(i * block // node != ((i + 2) * block - 1) // node for i in range(pp - 1))


def dp_rails(tp: int, dp: int, gpus_per_node: int) -> int:
    """How many of a node's network links a data-parallel group's inter-node traffic runs over: the group's ranks on
    one node. A node has one link (NIC) per device (``inter_node_gbps`` is a device's share: DGX A100, 8 HDR
    InfiniBand NICs); NCCL builds one ring per link and splits a collective over them, so a group with k ranks on a
    node crosses between nodes over k links at once, while the node's other links carry the other groups (the
    other tp ranks' dp groups, all reducing at the same time). A dp group holds every tp-th rank of its stage's
    block: min(dp, gpus_per_node / tp) ranks on a node. Without this, a small dp group at large tp looked as fast
    as a large one at small tp, and the planner could not reproduce Narayanan et al. 2021's Figures 14 and 15
    (throughput falls as pipeline or tensor parallelism replaces data parallelism, at every batch size)."""
    return max(1, min(dp, gpus_per_node // tp))


def step_time(cfg: RunConfig, hw: Hardware, gpus_per_node: int, zero_stage: int,
              stages: list[StageMemory]) -> StepTime:
    """Predicted time of one step of ``cfg`` (resolved for its layout) on ``hw``; ``stages`` is what
    ``predict_memory`` says about the same config (parameters per rank of each stage)."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, dp, sp = par.tensor, par.pipeline, par.data, par.sequence_parallel
    device = "cpu" if hw.name == "cpu" else "cuda"
    micro, accum, s = t.micro_batch_size, t.grad_accum_steps, m.seq_length
    e = 4 if t.precision == "fp32" else 2
    tokens = micro * s
    lat = hw.latency_us * 1e-6
    gemm_rate = hw.gemm_flops_per_s(t.precision)

    # FLOPs per token of every spec, and the part of each that grows with the sequence (the attention core)
    fwd = spec_flops(m)
    core = [a - b for a, b in zip(spec_flops(m, 2 * s), fwd)]
    is_block = block_anchors(m)
    if m.recompute == "full":
        again = [f if blk else 0.0 for f, blk in zip(fwd, is_block)]
    elif m.recompute == "selective":
        again = [c if blk else 0.0 for c, blk in zip(core, is_block)]
    else:
        again = [0.0] * len(fwd)

    # memory-bound traffic of a block, from what it keeps for backward with nothing recomputed
    attention = attention_kind(m, t.precision, device)
    plain = dataclasses.replace(m, recompute="none")
    kept = layer_activation_bytes(plain, micro, tp, sp, t.precision, attention, device)
    traffic_block = (TRAFFIC_FWD + TRAFFIC_BWD) * kept
    if m.recompute == "full":
        traffic_block += TRAFFIC_FWD * kept
    elif m.recompute == "selective":
        selective = dataclasses.replace(m, recompute="selective")
        traffic_block += TRAFFIC_FWD * (kept - layer_activation_bytes(selective, micro, tp, sp, t.precision,
                                                                      attention, device))
    traffic_head = (TRAFFIC_FWD + TRAFFIC_BWD) * head_activation_bytes(m, micro, tp, sp, t.precision, device)
    traffic_embed = (TRAFFIC_FWD + TRAFFIC_BWD) * embedding_activation_bytes(m, micro, tp, sp, t.precision)

    # tensor-parallel collectives per block (bytes of the full (B, T, h) activation)
    act = tokens * m.hidden_size * e
    tp_bw = hw.link_bytes_per_s(spans_nodes(tp, pp, dp, gpus_per_node, "tp"))
    ar = ring_time("all_reduce", act, tp, tp_bw, lat)
    ag = ring_time("all_gather", act, tp, tp_bw, lat, hw.gather_scatter_slowdown)
    if sp:  # forward 2 AG + 2 RS; backward 2 RS + 2 AG + 2 AG re-gathering the kept shards; recompute: forward again
        tp_block = 4 * ag + 6 * ag + (4 * ag if m.recompute == "full" else 0.0)
        tp_embed, tp_head = ag, 2 * ag
    else:  # forward 2 all-reduces, backward 2, recompute 2 more
        tp_block = 4 * ar + (2 * ar if m.recompute == "full" else 0.0)
        tp_embed, tp_head = ar, ar
    tp_head += 3 * ring_time("all_reduce", tokens * 4, tp, tp_bw, lat)  # the vocabulary-parallel loss: max, sum, target

    # one stage-to-stage message per micro batch each way: sequence shards under SP, else DeepSpeed's partitioned
    # tensors (a tp-th each, all-gathered inside the tp group on arrival)
    p2p_one = 0.0
    if pp > 1:
        pp_bw = hw.link_bytes_per_s(spans_nodes(tp, pp, dp, gpus_per_node, "pp"))
        p2p_one = ring_time("p2p", act / tp, 1, pp_bw, lat) + (0.0 if sp else ag)

    bounds = stage_bounds(m, pp)
    per_stage, parts = [], []
    for i in range(pp):
        specs = range(bounds[i], bounds[i + 1])
        blocks = sum(is_block[j] for j in specs)
        gemm = 3 * tokens * sum(fwd[j] for j in specs) / tp / gemm_rate
        regemm = tokens * sum(again[j] for j in specs) / tp / gemm_rate
        traffic = blocks * traffic_block + (traffic_embed if i == 0 else 0.0) + (traffic_head if i == pp - 1 else 0.0)
        mem = traffic / hw.memory_bytes_per_s
        comm = blocks * tp_block + (tp_embed if i == 0 else 0.0) + (tp_head if i == pp - 1 else 0.0)
        p2p = 2 * p2p_one
        parts.append((gemm, regemm, mem, comm, p2p))
        per_stage.append(gemm + regemm + mem + comm + p2p)
    slow = max(range(pp), key=per_stage.__getitem__)
    gemm, regemm, mem, comm, p2p = (accum * x for x in parts[slow])
    if pp > 1 and m.tie_embeddings:  # the first and last stages sum the tied embedding's gradient once a step
        grad = 4 if t.precision in ("fp32", "bf16") else 2
        p2p += ring_time("all_reduce", grad * m.padded_vocab_size * m.hidden_size / tp, 2, pp_bw, lat)
    bubble = sum(per_stage) - per_stage[slow]  # fill and drain: every other stage once

    # data parallelism: parameters of the slowest rank's stage (the pace) -- the heaviest is close enough
    params = max(st.params for st in stages)
    dp_comm = 0.0
    if dp > 1:
        dp_bw = hw.link_bytes_per_s(spans_nodes(tp, pp, dp, gpus_per_node, "dp")) * dp_rails(tp, dp, gpus_per_node)

        def coll(kind: str, nbytes: float) -> float:
            return ring_time(kind, nbytes, dp, dp_bw, lat, hw.gather_scatter_slowdown)

        grad = 4 if t.precision in ("fp32", "bf16") else 2  # bf16: DeepSpeed accumulates and reduces in fp32
        if zero_stage == 0:
            dp_comm = coll("all_reduce", grad * params)
        elif zero_stage == 1:
            first = "all_reduce" if t.precision == "bf16" else "reduce_scatter"
            dp_comm = coll(first, grad * params) + coll("all_gather", e * params)
        elif zero_stage == 2:
            dp_comm = accum * coll("reduce_scatter", e * params) + coll("all_gather", e * params)
        else:
            gathers = 3 if m.recompute == "full" else 2
            dp_comm = accum * (gathers * coll("all_gather", e * params) + coll("reduce_scatter", e * params))
    updated = params / dp if zero_stage >= 1 else params
    optimizer = OPTIMIZER_BYTES * updated / hw.memory_bytes_per_s

    per_token_model = 3 * sum(fwd)
    model_flops = t.global_batch_size * s * per_token_model
    hardware_flops = t.global_batch_size * s * (per_token_model + sum(again))
    return StepTime(compute=gemm, recompute=regemm, memory_bound=mem, tp_comm=comm, p2p=p2p, bubble=bubble,
                    dp_comm=dp_comm, optimizer=optimizer, hardware_flops=hardware_flops, model_flops=model_flops)
