"""The GPT's layer specs as a DeepSpeed ``PipelineModule`` (pp >= 1): tensor parallelism inside every stage,
stages contiguous and balanced by forward FLOPs (``mtnlg.model.layout.stage_bounds``), the tied embedding
shared by the first and last stage, and full recompute of each block when the config asks for it."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.deepspeed_compat import balanced_pipeline_module
from mtnlg.model.gpt import GPTLoss, layer_specs
from mtnlg.model.layout import stage_bounds
from mtnlg.parallel import Init, ParallelState, TPRandom
from mtnlg.parallel.layers import sum_replicated_grads


def pipeline_module(cfg: ModelConfig, ps: ParallelState, seed: int, rng: TPRandom | None = None):
    """The model of a resolved ``cfg`` for this rank's pipeline stage (a collective over the model's groups)."""
    rng = rng or TPRandom(seed, ps.tp_rank, ps.pp_rank)
    module = balanced_pipeline_module(
        stage_bounds(cfg, ps.pp_size),
        layers=layer_specs(cfg, ps, rng, Init(seed, cfg.init_std)),
        topology=ps.dims.topology(),
        loss_fn=GPTLoss(ps.tp_group, cfg.vocab_size),
        activation_checkpoint_interval=1 if cfg.recompute == "full" else 0,
        activation_checkpoint_func=rng.checkpoint,
        checkpointable_layers=["TransformerBlock"],
    )
    if ps.sequence_parallel:  # parameters applied to sequence shards: their gradients summed over tp
        sum_replicated_grads(module, ps.tp_group)
    return module
