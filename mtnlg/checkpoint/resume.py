"""Resuming: what ``checkpoint.load`` holds, whether every rank can read it, and loading it into an engine.

Nodes need not share a filesystem: rank 0 alone picks the checkpoint (from its disk) and tells the
others, and every rank checks that the files it will open are there and whole, so a node that lacks
them stops the job with its name instead of silently starting from iteration 0 (``plan_load``).
Three kinds load: ``native`` (same layout; DeepSpeed's ``load_checkpoint``), ``universal`` (from
``mtnlg checkpoint reshard``: any layout), ``weights`` (from ``mtnlg import-hf``: weights only, a
fresh optimizer; ``load_weights``).
"""

from __future__ import annotations

import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mtnlg.checkpoint import ds_files
from mtnlg.checkpoint.reader import NativeCheckpoint, check_same_model
from mtnlg.checkpoint.tags import TAG_RE, is_universal, is_weights_only, latest_tag
from mtnlg.config import RunConfig
from mtnlg.errors import JobError, UserError
from mtnlg.model.layout import saved_layers
from mtnlg.parallel import ParallelState


@dataclass
class LoadPlan:
    directory: str
    tag: str
    kind: str  # "native" (same layout), "universal" (from `mtnlg checkpoint reshard`), "weights" (import-hf)


def plan_load(cfg: RunConfig, zero_stage: int, ps: ParallelState | None = None,
              weights_only: bool = False) -> LoadPlan | None:
    """What checkpoint.load holds and how to load it into this run's layout (a resolved config, trained with ZeRO
    stage ``zero_stage``); checked before the engine is built.

    Rank 0 decides from its own disk and tells the other ranks; every rank then checks that the files it will
    load are there and whole (nodes need not share a filesystem). A collective when torch.distributed runs.
    ``weights_only`` (fine-tuning): a native checkpoint of any layout loads as weights, with a fresh optimizer."""
    if not cfg.checkpoint.load:
        return None
    distributed = dist.is_initialized()
    box: list = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            plan = _plan_on_this_host(cfg, zero_stage, weights_only)
            box = [(plan, None if plan is None else listing(Path(plan.directory) / plan.tag))]
        except UserError as e:
            box = [e]
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise JobError(str(box[0]))
    plan, sizes = box[0]
    if plan is None:
        return plan
    tag_dir = Path(plan.directory) / plan.tag
    names = list(sizes)  # universal and weights-only checkpoints: every rank reads from all of it
    if plan.kind == "native":  # the layout is this run's (plan_load refuses another)
        if ps is None:
            ps = ParallelState.create(cfg.parallel.tensor, cfg.parallel.pipeline) if distributed \
                else ParallelState.single()
        layers = saved_layers(cfg.model, ps.pp_size, ps.pp_rank) if ps.pp_size > 1 else []
        names = native_files(sizes, ps.tp_rank, ps.pp_rank, ps.dp_rank, ps.tp_size, ps.pp_size, layers)
    agree_readable(tag_dir, names, sizes, "checkpoint.load:")
    return plan


def check_save_target(cfg: RunConfig) -> None:
    """Never write over another run: a checkpoint.save directory that already holds a run (checkpoints or a
    metrics.jsonl) is accepted only when this run resumes it (checkpoint.load names the same directory).
    Rank 0 decides from its disk and tells the others (a collective when torch.distributed runs)."""
    save, load = cfg.checkpoint.save, cfg.checkpoint.load
    if not save or (load and Path(load).resolve() == Path(save).resolve()):
        return
    box: list = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        box = [_run_in(Path(save))]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise JobError(f"checkpoint.save = {save} already holds a run ({box[0]}); resume it with "
                       f"--set checkpoint.load={save}, or name a new directory for this run")


def _run_in(directory: Path) -> str | None:
    """What of a training run ``directory`` holds, or None."""
    if not directory.is_dir():
        return None
    tag = latest_tag(directory)
    if tag is not None:
        return f"checkpoint {tag}"
    steps = sorted(p.name for p in directory.glob("global_step*"))
    if steps or (directory / "latest").exists():
        return f"checkpoint files {steps[-1] if steps else 'latest'}"
    if (directory / "metrics.jsonl").is_file():
        return "a metrics.jsonl"
    return None


def _plan_on_this_host(cfg: RunConfig, stage: int, weights_only: bool = False) -> LoadPlan | None:
    load = cfg.checkpoint.load
    if Path(load).exists() and not Path(load).is_dir():
        raise UserError(f"checkpoint.load = {load} is a file; name the checkpoint.save directory of a run")
    tag = latest_tag(load)
    if tag is None:
        if cfg.checkpoint.save and Path(load).resolve() == Path(cfg.checkpoint.save).resolve():
            return None  # resuming into the save directory: nothing saved yet
        raise UserError(f"checkpoint.load = {load} holds no complete checkpoint (no global_step*/complete)")
    tag_dir = Path(load) / tag
    if is_weights_only(tag_dir):
        return LoadPlan(load, tag, "weights")
    if is_universal(tag_dir):
        if weights_only:
            raise UserError(f"{tag_dir} is a universal checkpoint; fine-tuning with a fresh optimizer reads the "
                            "weights of the original checkpoint in any layout: load that one")
        if stage == 0:
            raise UserError(f"{tag_dir} is a universal checkpoint; loading it needs ZeRO stage >= 1 "
                            "(ds_configs/zero1.json)")
        if stage == 3 and cfg.parallel.tensor > 1:
            raise UserError(f"DeepSpeed cannot load a universal checkpoint into ZeRO-3 with tensor parallelism "
                            f"({tag_dir}); use ZeRO-1/2 or parallel.tensor = 1")
        m = cfg.model
        if stage == 3 and m.padded_vocab_size != m.vocab_size:
            raise UserError(f"DeepSpeed's ZeRO-3 universal loader cannot re-pad the vocabulary ({m.vocab_size} -> "
                            f"{m.padded_vocab_size}); resume {tag_dir} under ZeRO-1/2, or train with a vocabulary "
                            f"size that is a multiple of {m.make_vocab_size_divisible_by} x tensor")
        return LoadPlan(load, tag, "universal")
    if weights_only:
        return LoadPlan(load, tag, "weights")
    native = NativeCheckpoint(Path(load), tag_dir, int(TAG_RE.match(tag).group(1)))
    check_same_model(native.model_cfg, cfg.model, f"checkpoint.load = {load}")
    saved = native.layout
    p = cfg.parallel
    moved = (saved.tp, saved.pp) != (p.tensor, p.pipeline) or saved.zero_stage != stage or (
        saved.dp != p.data and stage > 0)
    if moved:
        raise UserError(
            f"{tag_dir} was saved with tensor={saved.tp}, pipeline={saved.pp}, data={saved.dp}, "
            f"ZeRO-{saved.zero_stage} but this run is tensor={p.tensor}, pipeline={p.pipeline}, data={p.data}, "
            f"ZeRO-{stage}; convert it first: "
            f"mtnlg checkpoint reshard --checkpoint {load} --output {load}-universal, then load that"
        )
    return LoadPlan(load, tag, "native")


def load(engine, plan: LoadPlan | None) -> tuple[int, int]:
    """Load the planned checkpoint into a training engine (``mtnlg.training.engine.Engine``): (iteration, consumed
    samples) to resume from."""
    if plan is None:
        return 0, 0
    if plan.kind == "weights":  # from `mtnlg import-hf`: fine-tune from iteration 0, fresh optimizer
        load_weights(engine, Path(plan.directory) / plan.tag)
        return 0, 0
    from mtnlg.parallel.distributed import deepspeed_output

    with deepspeed_output(engine.cfg.logging.deepspeed == "info"):  # DeepSpeed's prints while it loads
        _, state = engine.engine.load_checkpoint(plan.directory, tag=plan.tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    if state is None:
        raise UserError(f"could not load checkpoint {plan.directory}/{plan.tag}; it is not a checkpoint of this "
                        "model/layout")
    engine.after_load(universal=plan.kind == "universal")
    return int(state["iteration"]), int(state["consumed_samples"])


def load_weights(engine, tag_dir: str | Path) -> None:
    """Load a checkpoint's weights (any layout) into a freshly built training ``Engine``; no optimizer state.

    Every rank reads the groups its pipeline stage holds and copies its tp shard into the module
    (``mtnlg.checkpoint.loader.shard_values``, the loader every other reader uses); ZeRO-3 parameters are
    gathered for the copy. DeepSpeed made its fp32 master weights from the random init at
    ``deepspeed.initialize``, so they are set too, from the fp32 values (``deepspeed_compat.set_fp32_masters``).
    """
    from mtnlg.checkpoint.loader import shard_values
    from mtnlg.deepspeed_compat import gathered_for_write, set_fp32_master, set_zero3_fp32_masters

    tag_dir = Path(tag_dir)
    ckpt = NativeCheckpoint(tag_dir.parent, tag_dir, int(TAG_RE.match(tag_dir.name).group(1)))
    cfg, ps = engine.cfg.model, engine.ps
    check_same_model(ckpt.model_cfg, cfg, f"checkpoint.load = {tag_dir.parent}")
    ds = engine.engine
    params = dict(ds.module.named_parameters())
    zero3 = engine.zero_stage == 3

    with torch.no_grad():
        for _, wanted, values in shard_values(ckpt, cfg, params, ps.tp_rank, ps.tp_size):
            if zero3:
                with gathered_for_write(list(wanted.values())):
                    for local, p in wanted.items():
                        p.data.copy_(values[local])
                continue
            for local, p in wanted.items():
                p.data.copy_(values[local])
                set_fp32_master(p, values[local])
        if zero3:
            def reread():  # a second read, for the masters of mixed precision
                for _, wanted, values in shard_values(ckpt, cfg, params, ps.tp_rank, ps.tp_size):
                    yield from ((p, values[local]) for local, p in wanted.items())
            set_zero3_fp32_masters(ds.optimizer, reread, ps.dp_size, engine.cfg.train.precision != "fp32")
    if ps.rank == 0:
        print(f"loaded the weights of {tag_dir} (weights only: training starts at iteration 0 with a fresh "
              "optimizer)", flush=True)


def listing(tag_dir: Path) -> dict[str, int]:
    """Every file under a checkpoint's tag directory (relative path -> size in bytes)."""
    return {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*")) if f.is_file()}


def native_files(seen: dict[str, int], tp_rank: int, pp_rank: int, dp_rank: int, tp: int, pp: int,
                 layer_files: list[int]) -> list[str]:
    """The files of a native checkpoint DeepSpeed (0.19.8) opens on the rank at (tp_rank, pp_rank, dp_rank) of a
    tp x pp layout: the model states of every model-parallel rank (``mp_rank_MM_model_states.pt``, or ZeRO-3's
    ``zero_pp_rank_D_mp_rank_MM_model_states.pt`` of its own D: its loader counts them against the saved
    model-parallel size), its own ZeRO optimizer partition (``[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt``)
    and, under pipeline parallelism, the files of its stage's layers (``layer_LL-model_TT-model_states.pt`` for LL in
    ``layer_files``). ``seen``: the files rank 0 sees, which tell the ZeRO-3 and optimizer-file naming in use."""
    mp = pp_rank * tp + tp_rank
    zero3 = any(ds_files.ZERO3_MODEL_STATES_RE.fullmatch(n) for n in seen)
    wanted = [ds_files.zero3_model_states(dp_rank, m) if zero3 else ds_files.model_states(m) for m in range(tp * pp)]
    optim = [n for n in seen if n.endswith(ds_files.OPTIM_SUFFIX)]
    if optim:
        prefix = "bf16_" if optim[0].startswith("bf16_") else ""
        wanted.append(ds_files.optim_states(dp_rank, mp, prefix))
    if pp > 1:
        wanted += [ds_files.layer_states(i, tp_rank) for i in layer_files]
    return wanted


def unreadable(tag_dir: Path, names: list[str], sizes: dict[str, int]) -> list[str]:
    """What is wrong with the files ``names`` of ``tag_dir`` on this host ('missing X', 'X is truncated'), comparing
    with ``sizes`` (as rank 0 sees them) and, for torch's zip format, opening the archive's directory (a file cut
    short has none)."""
    problems = []
    for name in names:
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"missing {name}")
            continue
        size = path.stat().st_size
        if size != sizes.get(name, size):
            problems.append(f"{name} has {size} bytes, not {sizes[name]}")
            continue
        if name.endswith(".pt"):
            with open(path, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"
            if is_zip:
                try:
                    zipfile.ZipFile(path).close()
                except (zipfile.BadZipFile, OSError):
                    problems.append(f"{name} is truncated or corrupt")
    return problems


def agree_readable(tag_dir: Path, names: list[str], sizes: dict[str, int], what: str) -> None:
    """Every rank checks its own ``names`` (a collective); if any rank lacks one or finds one damaged, every rank
    raises the same one-line error naming the hosts and files."""
    problems = unreadable(tag_dir, names, sizes)
    reports = [(socket.gethostname(), problems)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (socket.gethostname(), problems))
    by_host: dict[str, tuple[list[int], list[str]]] = {}
    for r, (host, found) in enumerate(reports):
        if found:
            ranks, items = by_host.setdefault(host, ([], []))
            ranks.append(r)
            items.extend(x for x in found if x not in items)
    if not by_host:
        return
    parts = []
    for host, (ranks, items) in by_host.items():
        shown = ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
        parts.append(f"host {host} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}): {shown}")
    damaged = any("truncated" in x or "bytes, not" in x for _, items in by_host.values() for x in items)
    fix = (f"the checkpoint was not written completely; remove {tag_dir} to resume from the one before it"
           if damaged else "every node must see the files its ranks load: put checkpoint.load on a shared "
           "filesystem or copy the checkpoint to every node")
    raise JobError(f"{what} {tag_dir} cannot be loaded: {'; '.join(parts)}; {fix}")
