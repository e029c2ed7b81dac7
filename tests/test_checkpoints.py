"""Checkpoints that hold on clusters: every file DeepSpeed writes is fsynced before the ``complete`` marker, and
nodes without a shared filesystem either resume together or stop with the name of the node that cannot.

The no-shared-disk cases run 4 ranks as 2 "nodes" (tests/dist_helper.py: each rank in its own mount and UTS
namespace, the checkpoint directory bind-mounted from its node's own disk), so what node1 writes, node0 never
sees, and the other way round."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_helper import nodes_supported, run_distributed, skip_unless_required
from tests.helpers import run_config

STEPS = 3


def _save_and_record(rank: int, world: int, save: str) -> dict:
    """Build an engine, save once, and report which files this rank wrote and which it fsynced."""
    import torch
    import torch.distributed as dist

    from mtnlg.checkpoint import saver as checkpoint
    from mtnlg.config import resolve
    from mtnlg.deepspeed_compat import record_writes
    from mtnlg.parallel import ParallelState
    from mtnlg.training.engine import Engine

    cfg = resolve(run_config("gpt2", tp=2, pp=2, zero=1, save=save), dist.get_world_size())
    engine = Engine(cfg, ParallelState.create(2, 2), torch.device("cpu"))
    synced, marker = [], Path(save) / "global_step1" / "complete"
    fsync = checkpoint.fsync_path
    # each fsync, and whether the marker already existed when it ran
    checkpoint.fsync_path = lambda path: (synced.append((str(path), marker.exists())), fsync(path))[1]
    try:
        checkpoint.save(engine.engine, cfg, 1, {"iteration": 1, "consumed_samples": 8}, dist.get_rank())
    finally:
        checkpoint.fsync_path = fsync
    return {"written": list(record_writes(engine.engine)), "synced": synced}


def test_every_checkpoint_file_is_fsynced_before_the_marker(tmp_path):
    """The writes mtnlg records (through DeepSpeed's checkpoint engine) are all the files DeepSpeed puts in the tag
    directory, on every kind of rank (tp x pp x dp = 2 x 2 x 2: layer files, model states, ZeRO partitions), and
    each rank fsyncs what it wrote before rank 0 writes the marker."""
    save = tmp_path / "ckpt"
    results = run_distributed(_save_and_record, 8, args=(str(save),))
    tag = save / "global_step1"
    on_disk = {str(f) for f in tag.iterdir() if f.suffix == ".pt"}
    written = {p for r in results for p in r["written"]}
    assert written == on_disk
    kinds = [sum(1 for f in on_disk if key in Path(f).name) for key in ("optim_states", "mp_rank_", "layer_")]
    assert kinds[0] == 8 and kinds[1] - kinds[0] == 4 and kinds[2] >= 4  # partitions, model states, layer files
    for r in results:
        synced = {path for path, _ in r["synced"]}
        assert set(r["written"]) <= synced and str(tag) in synced
        assert not any(after for _, after in r["synced"]), r["synced"]  # every fsync before the marker exists
    assert (tag / "complete").is_file() and (save / "latest").read_text() == "global_step1"


def _resume_on_nodes(rank: int, world: int, ckpt: str, first_half: bool) -> dict:
    """tp=1 x pp=2 x dp=2 with the checkpoint directory on each node's own disk. ``first_half``: an uninterrupted
    run, then the same run stopped half way (train.exit_interval), then an attempt to resume it. Otherwise just the
    resume. Returns the losses, or the error the resume raised."""
    from mtnlg.errors import JobError
    from mtnlg.training.loop import train

    common = {"architecture": "llama", "tp": 1, "pp": 2, "zero": 1, "iters": 2 * STEPS, "save": ckpt}
    out = {}
    if first_half:
        out["full"] = train(run_config(**{**common, "save": None})).losses
        out["first"] = train(run_config(exit_interval=STEPS, **common)).losses
    try:
        out["second"] = train(run_config(load=ckpt, **common)).losses
    except JobError as e:
        out["error"] = str(e)
    return out


@pytest.fixture(scope="module")
def nodes_ok():
    why = nodes_supported()
    if why:
        skip_unless_required(f"no private namespaces for simulated nodes: {why}")


def test_nodes_without_a_shared_disk(tmp_path, nodes_ok):
    """pp=2 x dp=2 on 2 nodes, node0 running stage 0 and node1 stage 1, each saving onto its own disk. Resuming,
    rank 0 picks the checkpoint from its disk (node1's has no ``complete`` marker and no ``latest``) and every rank
    checks the files it will open: each node lacks the other's model states, which DeepSpeed's loader opens on every
    rank, so the job stops with one line naming both nodes and the files (never a silent start from iteration 0 on
    node1). With exactly those files copied over, the resumed run continues the uninterrupted one bit for bit."""
    ckpt, disks = tmp_path / "ckpt", [tmp_path / "disk0", tmp_path / "disk1"]
    kwargs = {"nodes": 2, "node_dirs": {str(ckpt): str(tmp_path / "disk{node}")}}
    results = run_distributed(_resume_on_nodes, 4, args=(str(ckpt), True), **kwargs)
    errors = {r.get("error") for r in results}
    assert len(errors) == 1, results  # the same message on every rank
    (message,) = errors
    print(f"\n{message}")
    assert message and "\n" not in message and "shared filesystem" in message
    assert "host node0 (ranks 0, 1): missing mp_rank_01_model_states.pt" in message
    assert "host node1 (ranks 2, 3): missing mp_rank_00_model_states.pt" in message
    tag = f"global_step{STEPS}"
    assert (disks[0] / tag / "complete").is_file() and not (disks[1] / tag / "complete").exists()

    for mine, other in ((0, 1), (1, 0)):  # what the message asked for, and nothing else
        name = f"mp_rank_{mine:02d}_model_states.pt"
        (disks[other] / tag / name).write_bytes((disks[mine] / tag / name).read_bytes())
    resumed = run_distributed(_resume_on_nodes, 4, args=(str(ckpt), False), **kwargs)[0]
    assert "error" not in resumed, resumed
    assert {**results[0]["first"], **resumed["second"]} == results[0]["full"]
