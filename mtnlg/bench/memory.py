"""``mtnlg bench``'s memory section: activation memory with and without sequence parallelism and selective
recompute, the step-time price of recompute, and the memory model's prediction of each rank's peak against
the measured one, for several layouts.

- activations: at tp = 2 (2 ranks, 1 thread each), the bytes autograd keeps for backward over one micro
  batch's forward on a rank (``saved_tensors_hooks``; parameters excluded), for recompute none / selective /
  full, each with and without SP, next to ``mtnlg.training.memory``'s prediction;
- recompute cost: step times of none, selective and full (SP off), interleaved; overhead = t / t(none) - 1;
- peaks: each row a fresh worker group; each rank's peak of live tensor bytes over a training step (``TensorMemory``)
  against the prediction (weights, gradients, optimizer states, activations, DeepSpeed's reduction buckets).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from mtnlg.bench.runner import close_workers, config_variant, interleave, start_workers
from mtnlg.config import from_dict, resolve

RECOMPUTE = ("none", "selective", "full")
# (name, tensor, pipeline, data, zero stage, recompute, sequence parallel): a rank's peak, predicted and measured
PEAK_ROWS = [
    ("tp1", 1, 1, 1, 1, "none", False),
    ("tp2", 2, 1, 1, 1, "none", False),
    ("tp2 sp selective", 2, 1, 1, 1, "selective", True),
    ("tp2 full", 2, 1, 1, 1, "full", False),
    ("pp2", 1, 2, 1, 1, "none", False),
    ("dp2 zero2", 1, 1, 2, 2, "none", False),
    ("dp2 zero3", 1, 1, 2, 3, "none", False),
    ("tp2 pp2 sp selective", 2, 2, 1, 1, "selective", True),
]
MB = 2**20


def _log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


def _variant(base: dict, world: int, **changes: Any) -> dict:
    return config_variant(base, world, **changes)


class TensorMemory:
    """Live tensor bytes of this process, as an accelerator's allocator counts them (on CPU torch keeps no such
    statistic): the profiler, started before the model is built, records every CPU allocation and free with the
    size and address. ``peak_of(step)`` runs one more step and returns (live bytes when it began, their peak during
    it, the peak before it: building the model and earlier steps).

    The profiler records a free only on a thread it profiles: a tensor released on one of gloo's worker threads
    (e.g. the buffers of a collective whose work object dies there) never shows its free, and the allocator's
    running total keeps it forever (with tensor, pipeline and sequence parallelism together that was 100+ MB per
    rank after a few steps). So live bytes are summed per address: a new allocation at an address still counted
    live means the tensor there was freed unseen, and replaces it."""

    MARK = "mtnlg.bench.peak_step"

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def peak_of(self, step) -> tuple[float, float, float]:
        from torch._C._profiler import _EventType
        from torch.profiler import record_function

        with record_function(self.MARK):
            step()
        self.prof.__exit__(None, None, None)
        window, events = None, []
        stack = list(self.prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
                events.append((e.start_time_ns, e.typed[1].alloc_size, e.typed[1].ptr))
            elif e.name == self.MARK:
                window = (e.start_time_ns, e.end_time_ns)
        events.sort(key=lambda ev: (ev[0], ev[1] > 0))  # at one instant a free comes before an allocation
        live: dict[int, int] = {}
        total, before, during = 0, [0], []
        for t, size, ptr in events:
            total -= live.pop(ptr, 0)
            if size > 0:
                live[ptr] = size
                total += size
            (before if t < window[0] else during if t <= window[1] else []).append(total)
        return float(before[-1]), float(max(during or before[-1:])), float(max(before))


def _tiny(cfg: dict, world: int) -> dict:
    """``cfg`` with a 64-wide model of as few layers as its pipeline allows, in the same layout."""
    heads = 2 * cfg["parallel"]["tensor"]
    split = {f"model__{k}": None for k in ("encoder_layers", "decoder_layers") if k in cfg["model"]}  # T5: halves
    return config_variant(cfg, world, model__hidden_size=16 * heads, model__num_attention_heads=heads,
                          model__num_kv_heads=None, model__ffn_hidden_size=None, model__vocab_size=256,
                          model__num_layers=max(2, cfg["parallel"]["pipeline"]), **split)


def _predict(cfg_dict: dict, world: int, zero: int) -> list[float]:
    """Predicted peak bytes per rank (in global rank order) of a config at ``world`` ranks."""
    from mtnlg.parallel.state import ParallelDims
    from mtnlg.training.memory import predict_memory

    cfg = resolve(from_dict(cfg_dict), world)
    stages = predict_memory(cfg, zero, zero=_zero_section(zero))
    dims = ParallelDims(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.data)
    return [stages[dims.coords(r)["pp"]].total for r in range(world)]


def _zero_section(zero: int) -> dict:
    """The ``zero_optimization`` the rows run with (ZeRO-3 partitioning every parameter, as the tests do)."""
    return {"stage": zero, **({"stage3_param_persistence_threshold": 0} if zero == 3 else {})}


def _zero_json(zero: int, out_dir: Path) -> str:
    import json

    path = out_dir / f"zero{zero}.json"
    path.write_text(json.dumps({"zero_optimization": _zero_section(zero)}))
    return str(path)


def memory_section(base: dict, steps: int, warmup: int, logs: Path) -> dict[str, Any]:
    """The section's figures (see the module docstring); ``base`` is the bench's run config as a dict."""
    out = activations(base, logs)
    out["recompute_time"] = recompute_time(base, steps, warmup, logs)
    out["peaks"] = peaks(base, warmup, logs)
    return out


def activations(base: dict, logs: Path) -> dict[str, Any]:
    """Saved activation bytes per rank at tp = 2 for each recompute choice, with and without SP: all of them and
    those of the transformer blocks (the per-layer memory SP and recompute act on), the blocks' predicted."""
    from mtnlg.training.memory import attention_kind, layer_activation_bytes

    out: dict[str, Any] = {"activations": []}
    micro = base["train"]["micro_batch_size"]
    common = dict(train__global_batch_size=micro, parallel__tensor=2)
    workers = start_workers({"act": (2, 1)}, logs)
    try:
        for recompute in RECOMPUTE:
            for sp in (False, True):
                cfg = _variant(base, 2, model__recompute=recompute, parallel__sequence_parallel=sp, **common)
                workers["act"].build("mtnlg", cfg)
                saved = workers["act"].call({"op": "activations"})
                r = resolve(from_dict(cfg), 2)
                m, t = r.model, r.train
                kind = attention_kind(m, t.precision)
                predicted_layers = m.num_layers * layer_activation_bytes(m, micro, 2, sp, t.precision, kind)
                out["activations"].append({"recompute": recompute, "sequence_parallel": sp, "bytes": saved["bytes"],
                                           "blocks_bytes": saved["blocks_bytes"],
                                           "predicted_blocks_bytes": predicted_layers})
                _log(f"[memory] tp=2 recompute={recompute} sp={sp}: {max(saved['bytes']) / MB:.1f} MB saved per "
                     f"rank, {max(saved['blocks_bytes']) / MB:.1f} MB by the blocks (predicted "
                     f"{predicted_layers / MB:.1f} MB)")
    finally:
        close_workers(workers)

    def pick(recompute: str, sp: bool) -> dict:
        return next(r for r in out["activations"] if r["recompute"] == recompute and r["sequence_parallel"] == sp)

    for key, what in (("bytes", ""), ("blocks_bytes", "blocks_")):
        ratio = max(pick("selective", True)[key]) / max(pick("none", False)[key])
        out[f"sp_selective_over_none_{what}".rstrip("_")] = ratio
    _log(f"[memory] with SP + selective recompute: {out['sp_selective_over_none_blocks']:.2f}x the blocks' activations "
         f"without either ({out['sp_selective_over_none']:.2f}x of all activations)")
    return out


def recompute_time(base: dict, steps: int, warmup: int, logs: Path, micro_batches: int = 4) -> dict[str, Any]:
    """Step times of recompute none / selective / full at tp = 2 (SP off), interleaved, and their overheads. A step
    accumulates ``micro_batches`` micro batches, so that the optimizer's step (the same in all three) does not
    dilute the price of recomputing."""
    common = dict(train__global_batch_size=base["train"]["micro_batch_size"] * micro_batches, parallel__tensor=2)
    specs = {rc: (2, 1) for rc in RECOMPUTE}
    workers = start_workers(specs, logs)
    try:
        for rc in RECOMPUTE:
            workers[rc].build("mtnlg", _variant(base, 2, model__recompute=rc, **common))
        timed = interleave(workers, steps, warmup)
    finally:
        close_workers(workers)
    t = {rc: statistics.median(timed[rc]["times"]) for rc in RECOMPUTE}
    over = {rc: t[rc] / t["none"] - 1 for rc in ("selective", "full")}
    _log(f"[memory] recompute overhead: selective {100 * over['selective']:.1f}%, full {100 * over['full']:.1f}%")
    return {"step_s_median": t, "overhead": over,
            "selective_over_full": over["selective"] / over["full"] if over["full"] > 0 else None}


def live_peak(cfg: dict, world: int, warmup: int, logs: Path) -> dict[str, Any]:
    """One layout's per-rank peak of live tensors over a training step after ``warmup`` steps (the optimizer's
    states exist by then), in a fresh worker group: ``peak`` and ``start`` (live bytes when the step began), the
    resident set's growth over the steps (``rss_mb``) and over building the model (``build_rss_mb``), ``info``."""
    return live_peaks([cfg], world, warmup, logs)[0]


def live_peaks(cfgs: list[dict], world: int, warmup: int, logs: Path) -> list[dict[str, Any]]:
    """``live_peak`` of several configs of one world size (e.g. one per model family), one after the other in one
    worker group: one launch. Each setup's live tensors are counted from its own build on (the previous one is
    dropped first), so the figures are each setup's own; the resident set's growth is only meaningful for the
    first (the allocator keeps what an earlier setup freed)."""
    from mtnlg.bench.runner import build_command

    out = []
    workers = start_workers({"peak": (world, 1)}, logs)
    w = workers["peak"]
    try:
        # a tiny model in the same layout first: the modules, buffers and communicators a first engine
        # brings (an accelerator's context, not the model's memory) are in place before the one measured
        w.build("mtnlg", _tiny(cfgs[0], world))
        for cfg in cfgs:
            info = w.call({**build_command("mtnlg", cfg), "tensor_memory": True})["info"]
            built = w.steps(0)["mem_mb"]  # the resident peak while building
            run = w.call({"op": "steps", "n": max(warmup, 1), "reset_peak": True})
            live = w.call({"op": "tensor_peak"})
            before = w.call({"op": "rss"})["mb"]
            out.append({"peak": live["peak"], "start": live["start"], "info": info,
                        "rss_mb": [p - b for p, b in zip(run["mem_mb"], before)],
                        "build_rss_mb": [p - b for p, b in zip(built, before)]})
    finally:
        close_workers(workers)
    return out


def peaks(base: dict, warmup: int, logs: Path, rows: list[tuple] | None = None,
          others: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Each ``PEAK_ROWS`` layout's per-rank peak of live tensors over a training step (``live_peak``), measured and
    predicted; the resident set's growth over the steps and over building the model alongside. ``others``: more
    run configs (name -> config dict, e.g. a BERT and a T5 model) measured in each row's layout too, in the same
    launch; their rows are named ``"<row> <name>"``."""
    out = []
    for name, tp, pp, dp, zero, recompute, sp in rows or PEAK_ROWS:
        world = tp * pp * dp
        m_count = 4 if pp > 1 else 1
        named = {"": base, **(others or {})}
        cfgs = {}
        for tag, b in named.items():
            cfg = _variant(b, world, parallel__tensor=tp, parallel__pipeline=pp, parallel__sequence_parallel=sp,
                           model__recompute=recompute,
                           train__global_batch_size=b["train"]["micro_batch_size"] * dp * m_count)
            cfg["deepspeed_config"] = _zero_json(zero, logs)
            cfgs[tag] = cfg
        got_all = live_peaks(list(cfgs.values()), world, warmup, logs)
        for (tag, cfg), got in zip(cfgs.items(), got_all):
            row_name = f"{name} {tag}".strip()
            measured = [b / MB for b in got["peak"]]
            predicted = [x / MB for x in _predict(cfg, world, zero)]
            ratio = [a / b for a, b in zip(measured, predicted)]
            out.append({"name": row_name, "architecture": cfg["model"].get("architecture"),
                        "layout": got["info"]["layout"], "zero": zero, "recompute": recompute,
                        "measured_mb": measured, "predicted_mb": predicted, "measured_over_predicted": ratio,
                        "step_start_mb": [b / MB for b in got["start"]], "rss_peak_mb": got["rss_mb"],
                        "build_rss_peak_mb": got["build_rss_mb"]})
            _log(f"[memory] {row_name}: peak of live tensors {[round(x) for x in measured]} MB, predicted "
                 f"{[round(x) for x in predicted]} MB per rank (measured/predicted {min(ratio):.2f}-{max(ratio):.2f}; "
                 f"resident set grew {[round(x) for x in got['rss_mb']]} MB)")
    return out
