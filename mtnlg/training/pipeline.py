"""A model family's layer specs as a DeepSpeed ``PipelineModule`` (pp >= 1): tensor parallelism inside every stage,
stages contiguous and balanced by forward FLOPs (``mtnlg.model.layout.stage_bounds``), the tied embedding
shared by the first and last stage, and full recompute of each block when the config asks for it."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.deepspeed_compat import balanced_pipeline_module
from mtnlg.model.layout import stage_bounds
from mtnlg.model.registry import family, is_block
from mtnlg.parallel import Init, ParallelState, TPRandom
from mtnlg.parallel.layers import sum_replicated_grads


def pipeline_module(cfg: ModelConfig, ps: ParallelState, seed: int, rng: TPRandom | None = None):
    """The model of a resolved ``cfg`` for this rank's pipeline stage (a collective over the model's groups)."""
    rng = rng or TPRandom(seed, ps.tp_rank, ps.pp_rank)
    fam = family(cfg)
    specs = fam.layer_specs(cfg, ps, rng, Init(seed, cfg.init_std))
    module = balanced_pipeline_module(
        stage_bounds(cfg, ps.pp_size),
        layers=specs,
        topology=ps.dims.topology(),
        loss_fn=fam.loss(cfg, ps),
        activation_checkpoint_interval=1 if cfg.recompute == "full" else 0,
        activation_checkpoint_func=rng.checkpoint,
        checkpointable_layers=sorted({s.typename.__name__ for s in specs if is_block(s.typename)}),
    )
    if ps.sequence_parallel:  # parameters applied to sequence shards: their gradients summed over tp
        sum_replicated_grads(module, ps.tp_group)
    return module
