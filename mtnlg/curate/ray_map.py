"""The map phase on a Ray cluster, run by datatrove's ``RayPipelineExecutor``.

The per-shard work is a datatrove pipeline step (``CurateShards``): task ``rank`` of ``tasks`` takes the shards
``todo[rank::tasks]``, reads each ``work/docs-NNNNN.jsonl``, runs the per-document steps (``rules.run_shard``) and
writes ``work/map-NNNNN.{npy,json}`` itself (the JSON last: it marks the shard done). So, as datatrove's executors
require, the output directory must be on storage that every node sees at the same path (the driver's node
included); the driver reads the per-shard results from there once every task has finished.

datatrove's executor gives each task a placement group of one bundle (``cpus_per_task`` CPUs), runs the task in a
``RankWorker`` actor, retries tasks whose worker died, and writes its logs, stats and completions to
``work/ray-logs/``. Resume is mtnlg's per-shard marker, not datatrove's per-rank completions (``skip_completed`` is
off): a rerun splits the shards still to do among its own tasks.

An address where no Ray head answers was refused before anything started (``pipeline.check_reachable``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep

from mtnlg.curate.pipeline import Run, read_docs, write_map
from mtnlg.curate.rules import run_shard
from mtnlg.errors import UserError

CPUS_PER_TASK = 1
MEM_PER_CPU_GB = 0.5  # the reservation per task (a shard of text and its signatures), not a limit


class _Payload:
    """What every task needs (the run's fingerprint and the worker state), carried by pickle inside the executor; its
    ``str`` is what datatrove writes for it in ``executor.json`` (not the benchmark n-grams)."""

    def __init__(self, key: str, state: tuple):
        self.key, self.state = key, state

    def __str__(self) -> str:
        cfg, bench, tokenizer_dir = self.state
        return f"run {self.key}: steps {cfg.steps}, {len(bench)} benchmark n-grams, tokenizer {tokenizer_dir}"


class CurateShards(PipelineStep):
    """datatrove pipeline step: task ``rank`` of ``world_size`` runs the per-document steps on its share of the
    shards and writes their results."""

    name = "mtnlg curate shards"
    type = "mtnlg"

    def __init__(self, root: str, todo: list[int], payload: _Payload):
        super().__init__()
        self.root, self.todo, self.payload = root, todo, payload

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Any:
        run = Run(self.root)
        for s in self.todo[rank::world_size]:
            if run.map_json(s).is_file():
                continue
            with self.track_time("shard"):
                res = run_shard(self.payload.key, self.payload.state, read_docs(run.docs(s)))
            write_map(run, s, res)
            self.stat_update("shards")
            self.stat_update("documents", value=len(res.rows))
        return iter(())


def ray_map(root: Path, todo: list[int], key: str, state: tuple, address: str, log: Any) -> None:
    """Run the shards ``todo`` on the Ray cluster at ``address`` through datatrove's ``RayPipelineExecutor``."""
    import ray
    from datatrove.executor.ray import RayPipelineExecutor
    from loguru import logger

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    logger.disable("datatrove")  # its progress lines; failures are reported below, its logs stay in ray-logs/
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        tasks = max(1, min(len(todo), cpus // CPUS_PER_TASK))
        log(f"curate: {len(todo)} shards as {tasks} datatrove tasks on the Ray cluster at {address} "
            f"({len(ray.nodes())} nodes, {cpus} CPUs)")
        executor = RayPipelineExecutor(
            [CurateShards(str(root), todo, _Payload(key, state))], tasks=tasks, workers=tasks,
            skip_completed=False, logging_dir=str(Path(root) / "work" / "ray-logs"), cpus_per_task=CPUS_PER_TASK,
            mem_per_cpu_gb=MEM_PER_CPU_GB)
        executor.run()
    finally:
        logger.enable("datatrove")
        ray.shutdown()
    missing = [s for s in todo if not Run(root).map_json(s).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(todo)} shards have no result after the Ray run (first: shard "
                        f"{missing[0]}); see {Path(root) / 'work' / 'ray-logs' / 'logs'}; the output directory "
                        "must be on storage every node sees at the same path. Rerun to resume")
