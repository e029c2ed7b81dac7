"""DeepSpeed's checkpoint file names and state keys, in one place (DeepSpeed 0.19.8's layout, NOTES.md):

    <tag>/mp_rank_MM_model_states.pt                    per model-parallel rank MM (pp-major): "module" (pp = 1),
                                                        "param_shapes", "checkpoint_parallel_dimensions", ...
    <tag>/zero_pp_rank_D_mp_rank_MM_model_states.pt     the same under ZeRO-3, per dp rank D
    <tag>/layer_LL-model_TT-model_states.pt             pp > 1: layer spec LL's weights on tp rank TT
    <tag>/[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt   ZeRO optimizer partition of dp rank D

The readers (``reader``, ``resume``), the weights-only writer and ``reshard`` use these; ``deepspeed_compat`` keeps
its own few (it sits below every package and imports none).
"""

from __future__ import annotations

import re

# state keys of a model-states file
MODULE = "module"
PARAM_SHAPES = "param_shapes"
PARALLEL_DIMS = "checkpoint_parallel_dimensions"  # {"tp_degree": ..., "pp_degree": ...}
DP_WORLD_SIZE = "dp_world_size"
DS_CONFIG = "ds_config"
# ... and of an optimizer file
OPTIMIZER_STATE = "optimizer_state_dict"
FP32_PARTITIONS = "single_partition_of_fp32_groups"  # ZeRO 1/2 and the BF16 optimizer
SLICE_MAPPINGS = "param_slice_mappings"
FP32_FLAT_GROUPS = "fp32_flat_groups"  # ZeRO-3

OPTIM_SUFFIX = "optim_states.pt"
ZERO3_MODEL_STATES_RE = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")


def model_states(mp: int) -> str:
    return f"mp_rank_{mp:02d}_model_states.pt"


def zero3_model_states(dp: int, mp: int) -> str:
    return f"zero_pp_rank_{dp}_{model_states(mp)}"


def layer_states(layer: int, tp: int) -> str:
    return f"layer_{layer:02d}-model_{tp:02d}-model_states.pt"


def optim_states(dp: int, mp: int, prefix: str = "") -> str:
    """``prefix``: "bf16_" for DeepSpeed's BF16 optimizer, "" otherwise."""
    return f"{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_{OPTIM_SUFFIX}"


def optim_glob(dp: int | str = "*", mp: int | None = None) -> str:
    """A glob for optimizer files (any prefix) of dp rank ``dp`` and model-parallel rank ``mp`` (default: all)."""
    return f"*zero_pp_rank_{dp}_mp_rank_{'*' if mp is None else f'{mp:02d}'}_{OPTIM_SUFFIX}"


def untrained_model_states(tp: int, pp: int, ds_version: str) -> dict:
    """The non-weight entries DeepSpeed puts in a model-states file, for an engine that has not trained (ZeRO-0,
    dp = 1): what a weights-only checkpoint writes beside its weights."""
    return {
        "buffer_names": [], "optimizer": None, PARAM_SHAPES: None, "frozen_param_shapes": None,
        "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None, "data_sampler": None,
        "random_ltd": None, "skipped_steps": 0, "global_steps": 0, "global_samples": 0,
        DP_WORLD_SIZE: 1, "mp_world_size": tp * pp, PARALLEL_DIMS: {"pp_degree": pp, "tp_degree": tp},
        DS_CONFIG: {"zero_optimization": {"stage": 0}}, "ds_version": ds_version,
    }
