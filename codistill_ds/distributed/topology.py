"""The process groups and the DeviceMesh of a codistillation job, built once from its axes.

`ParallelDims` (axes.py) is the arithmetic; `Topology` holds what that arithmetic turns into on
a live world, and answers by role so that no other module computes ranks:

| attribute        | members                                   | carries                                    |
|------------------|-------------------------------------------|--------------------------------------------|
| `group`          | all S ranks of my group                   | sharding and gradient reduction (T = 1), the group's bookkeeping (loss means, NaN flags) |
| `exchange_group` | the same ranks, used only by the exchange | gathers/scatters of the `leaders` route, on the exchange's own thread |
| `leaders`        | position 0 of every group                 | logit exchange, route `leaders`            |
| `rail`           | position p of every group                 | logit exchange, route `rails`; weight exchange (the mesh's `codistill` axis) |
| `tp_group`       | my T tensor-parallel ranks                | vocabulary-sliced exchange math, TP collectives |
| `exchange_tp_group` | the same, used only by the exchange    | reassembling the peers' rows after a swap (T > 1) |
| `dp_group`       | my group's ranks with my TP rank          | ZeRO's data-parallel group under TP (= `group` when T = 1) |
| `solo`           | this rank alone                           | DeepSpeed's model-parallel group when T = 1 (it all-reduces norms on it) |

`torch.distributed.new_group` is itself a collective over the whole world: every rank creates
every group, in the same order, even the ones it is not a member of. The exchange has process
groups of its own (`exchange_group`, `leaders`, `rail`): an asynchronous exchange runs on a
background thread, and a process group must never carry collectives from two threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from codistill_ds.distributed.axes import AXES, ParallelDims, TopologyError

__all__ = ["AXES", "GroupMPU", "ParallelDims", "Topology", "TopologyError", "build_topology", "world_topology"]


@dataclass
class Topology:
    """The axes plus this rank's live process groups."""

    dims: ParallelDims
    group: dist.ProcessGroup
    exchange_group: dist.ProcessGroup
    rail: dist.ProcessGroup
    leaders: dist.ProcessGroup | None
    """None on non-leaders: they never talk across groups on the leaders route."""
    solo: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    exchange_tp_group: dist.ProcessGroup | None = None
    """My TP ranks again, used only by the exchange (it reassembles the rows its TP ranks
    received, on the exchange's own thread); None when T = 1."""
    _meshes: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- who I am, by role ------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.dims.rank

    @property
    def groups(self) -> int:
        """K, the number of codistillation groups (in this job or across jobs)."""
        return self.dims.codistill_groups

    @property
    def group_id(self) -> int:
        return self.dims.group_id

    @property
    def group_size(self) -> int:
        """S: ranks that hold one replica."""
        return self.dims.group_size

    @property
    def position(self) -> int:
        """My place in my group: my rail, my slot of each exchange batch."""
        return self.dims.position

    @property
    def data_rank(self) -> int:
        return self.dims.data_rank

    @property
    def data_size(self) -> int:
        return self.dims.data_size

    @property
    def tp_rank(self) -> int:
        return self.dims.tp_rank

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def is_leader(self) -> bool:
        return self.dims.is_leader

    # ---- meshes -------------------------------------------------------------------------------
    def mesh(self, device_type: str):
        """The job's DeviceMesh over the axes with more than one rank (codistill and dp_shard are
        always present), built once from this topology's own process groups, so that no FSDP or
        TP collective can ever span two codistillation groups."""
        if device_type not in self._meshes:
            self._meshes[device_type] = self._build_mesh(device_type)
        return self._meshes[device_type]

    def shard_mesh(self, device_type: str):
        """What FSDP2 shards over: `dp_shard`, or (`replicate`, `dp_shard`) for HSDP."""
        mesh = self.mesh(device_type)
        return mesh["replicate", "dp_shard"] if self.dims.replicate > 1 else mesh["dp_shard"]

    def tp_mesh(self, device_type: str):
        """The `tp` axis, for DTensor tensor parallelism (None when T = 1)."""
        return self.mesh(device_type)["tp"] if self.dims.tp > 1 else None

    def _build_mesh(self, device_type: str):
        from torch.distributed.device_mesh import DeviceMesh

        d = self.dims
        names = [a for a in AXES if a in ("codistill", "dp_shard") or dict(zip(AXES, d.shape))[a] > 1]
        groups = {"codistill": self.rail, "dp_shard": self._axis_group("dp_shard"),
                  "replicate": self._axis_group("replicate"), "tp": self.tp_group}
        shape = [dict(zip(AXES, d.shape))[a] for a in names]
        full = torch.arange(d.world_size).view(*d.shape)
        keep = tuple(slice(None) if a in names else 0 for a in AXES)
        return DeviceMesh.from_group([groups[a] for a in names], device_type,
                                     mesh=full[keep].reshape(shape), mesh_dim_names=tuple(names))

    def _axis_group(self, axis: str) -> dist.ProcessGroup:
        """My process group along `replicate` or `dp_shard` (built on first use, by every rank)."""
        key = f"pg:{axis}"
        if key not in self._meshes:
            if axis == "dp_shard" and self.dims.replicate == 1 and self.dims.tp == 1:
                self._meshes[key] = self.group
            else:
                self._meshes[key] = _my_groups(self.dims, self.dims.axis_partitions(axis))
        return self._meshes[key]


def _my_groups(dims: ParallelDims, partitions: list[list[int]], backend: str | None = None):
    """Create every group of a partition of the world (a world collective); return mine."""
    mine = None
    for ranks in partitions:
        pg = dist.new_group(ranks, backend=backend)
        if dims.rank in ranks:
            mine = pg
    return mine


def build_topology(dims: ParallelDims, exchange_backend: str | None = None) -> Topology:
    """Create every process group of the layout; collective over the whole world.

    `exchange_backend` ("nccl" | "gloo", None = the default group's) is given to the groups that
    carry the cross-group exchange only (leaders, rails, `exchange_group`): "gloo" sends the small
    exchange payload from host memory (across sites, or two groups on one GPU), while `group`
    keeps the default backends for ZeRO/FSDP traffic. When the job is one group of several
    (`transport: torchft`), the cross-group links are torchft quorums, not process groups of
    this job, and the rail and leaders groups have one member."""
    if dims.world_size != dist.get_world_size() or dims.rank != dist.get_rank():
        raise TopologyError(f"axes laid out for rank {dims.rank} of {dims.world_size}, but this process is "
                            f"rank {dist.get_rank()} of {dist.get_world_size()}")
    groups = [dims.group_ranks(dims.first_group + g) for g in range(dims.groups)]
    group = _my_groups(dims, groups)
    exchange_group = _my_groups(dims, groups, exchange_backend)
    leaders = dist.new_group(dims.leader_ranks(), backend=exchange_backend)
    rail = _my_groups(dims, [dims.rail_ranks(p) for p in range(dims.group_size)], exchange_backend)
    solo = _my_groups(dims, [[r] for r in range(dims.world_size)])
    tp_group = _my_groups(dims, dims.axis_partitions("tp")) if dims.tp > 1 else solo
    dp_group = group if dims.tp == 1 else _my_groups(
        dims, list({tuple(dims.data_parallel_ranks(r)): None for r in range(dims.world_size)}))
    exchange_tp = _my_groups(dims, dims.axis_partitions("tp"), exchange_backend) if dims.tp > 1 else None
    return Topology(dims, group, exchange_group, rail, leaders if dims.is_leader else None, solo, tp_group,
                    dp_group, exchange_tp)


class GroupMPU:
    """The `mpu` object DeepSpeed asks for: it makes ZeRO shard and reduce inside my group only.

    DeepSpeed reads the data-parallel group for ZeRO partitioning and gradient reduction, and
    the model-parallel group for gradient-norm all-reduces. It must not have an
    `initialize_sequence_parallel` attribute: DeepSpeed then takes a different path and returns
    no data-parallel group. Setting `deepspeed.utils.groups.mpu` globally instead is a trap: ZeRO-3
    then partitions over the whole world and the groups silently share one model.
    """

    def __init__(self, topology: Topology) -> None:
        self._t = topology

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._t.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self._t.data_size

    def get_data_parallel_rank(self) -> int:
        return self._t.data_rank

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._t.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self._t.tp

    def get_model_parallel_rank(self) -> int:
        return self._t.tp_rank

    # Newer DeepSpeed code paths ask for the tensor-parallel names.
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def world_topology(groups: int, *, replicate: int = 1, tp: int = 1, exchange_backend: str | None = None) -> Topology:
    """`build_topology` for the live world split into `groups` groups (tests, benchmarks)."""
    dims = ParallelDims(world_size=dist.get_world_size(), groups=groups, rank=dist.get_rank(),
                        replicate=replicate, tp=tp)
    return build_topology(dims, exchange_backend)
