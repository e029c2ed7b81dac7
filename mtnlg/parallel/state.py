"""Process groups for tensor (tp), pipeline (pp) and data (dp) parallelism.

Rank layout comes from DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model;
model = tp varies fastest), so our groups contain exactly the ranks DeepSpeed's pipeline
engine puts together. A ``ParallelState`` is an explicit object handed to the layers that
need a group; it also implements the ``mpu`` interface DeepSpeed's engine asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

AXES = {"tp": "model", "pp": "pipe", "dp": "data"}


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of the three axes. Pure arithmetic, no processes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def topology(self) -> PipeModelDataParallelTopology:
        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)

    def coords(self, rank: int) -> dict[str, int]:
        """{'tp': .., 'pp': .., 'dp': ..} of a global rank."""
        c = self.topology().get_coord(rank)
        return {"tp": c.model, "pp": c.pipe, "dp": c.data}

    def rank_of(self, tp: int, pp: int, dp: int) -> int:
        return self.topology().get_rank(model=tp, pipe=pp, data=dp)

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks along ``axis`` ('tp', 'pp' or 'dp')."""
        if axis == "mp":  # tp x pp: the ranks that hold one replica of the model
            return [self.topology().get_axis_list("data", d) for d in range(self.dp)]
        return self.topology().get_axis_comm_lists(AXES[axis]) or [[r] for r in range(self.world_size)]


class ParallelState:
    """This rank's place in the (tp, pp, dp) grid and its process groups.

    Build it with ``ParallelState.create(tp, pp)`` after ``torch.distributed`` is initialised
    (every rank must call it: group creation is collective), or ``ParallelState.single()``
    for one process without any distributed setup.
    """

    def __init__(self, dims: ParallelDims, rank: int, groups: dict[str, object | None],
                 sequence_parallel: bool = False):
        self.dims = dims
        self.rank = rank
        # activations outside the tensor-parallel regions are split along the sequence over the tp group
        self.sequence_parallel = sequence_parallel and dims.tp > 1
        c = dims.coords(rank)
        self.tp_rank, self.pp_rank, self.dp_rank = c["tp"], c["pp"], c["dp"]
        self.tp_group = groups.get("tp")
        self.pp_group = groups.get("pp")
        self.dp_group = groups.get("dp")
        self.mp_group = groups.get("mp")  # tp x pp, what DeepSpeed calls the model-parallel group

    @classmethod
    def single(cls) -> ParallelState:
        return cls(ParallelDims(), 0, {})

    @classmethod
    def create(cls, tp: int = 1, pp: int = 1, sequence_parallel: bool = False) -> ParallelState:
        world = dist.get_world_size()
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp*pp = {tp * pp}")
        dims = ParallelDims(tp=tp, pp=pp, dp=world // (tp * pp))
        rank = dist.get_rank()
        mine: dict[str, object] = {}
        for axis in ("tp", "pp", "dp", "mp"):  # same order on every rank
            for ranks in dims.groups(axis):
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    mine[axis] = group
        return cls(dims, rank, mine, sequence_parallel)

    # --- convenience
    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    def __repr__(self) -> str:
        d = self.dims
        return (
            f"ParallelState(rank={self.rank}, tp={self.tp_rank}/{d.tp}, pp={self.pp_rank}/{d.pp}, "
            f"dp={self.dp_rank}/{d.dp})"
        )

    # --- DeepSpeed's mpu interface (names fixed by DeepSpeed)
    def get_global_rank(self) -> int:
        return self.rank

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.dims.tp + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp * self.dims.pp

    def get_model_parallel_group(self):
        return self.mp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank - self.tp_rank

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.dims.pp

    def get_pipe_parallel_group(self):
        return self.pp_group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return next(g for g in self.dims.groups("dp") if self.rank in g)
