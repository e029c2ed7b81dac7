"""Process groups and Megatron tensor-parallel layers. Knows nothing of GPT."""

from mtnlg.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.parallel.kl_divergence import vocab_parallel_kl_divergence
from mtnlg.parallel.layers import (
    ColumnParallelLinear,
    Init,
    RowParallelLinear,
    Sharding,
    VocabParallelEmbedding,
    replicated,
    set_sharding,
)
from mtnlg.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from mtnlg.parallel.random import TPRandom
from mtnlg.parallel.state import ParallelDims, ParallelState

__all__ = [
    "ColumnParallelLinear",
    "Init",
    "ParallelDims",
    "ParallelState",
    "RowParallelLinear",
    "Sharding",
    "TPRandom",
    "VocabParallelEmbedding",
    "copy_to_tp",
    "gather_from_tp",
    "replicated",
    "reduce_from_tp",
    "scatter_to_tp",
    "set_sharding",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_kl_divergence",
]
