"""Codistillation topology: which ranks form a group, and the process groups built from that.

    world = K codistillation groups x S shard ranks        (group-major, contiguous)

Group g owns global ranks [g*S, (g+1)*S), so a group can be laid onto whole nodes and its
ZeRO/FSDP traffic stays on intra-node links. Three kinds of process group are built once:

| name    | members                      | carries                                          |
|---------|------------------------------|--------------------------------------------------|
| group   | all S ranks of my group      | ZeRO/FSDP sharding, gradient reduction, gathers  |
| leaders | local rank 0 of every group  | logit exchange, route `leaders`                  |
| rail r  | local rank r of every group  | logit exchange, route `rails`; weight exchange   |

`torch.distributed.new_group` is itself a collective over the whole world: every rank must
create every group, in the same order, even the ones it is not a member of.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class TopologyError(ValueError):
    """A world size and group count that cannot be laid out."""


@dataclass(frozen=True)
class Layout:
    """Pure arithmetic of the layout; no process groups, so it is testable anywhere."""

    world_size: int
    groups: int
    rank: int
    first_group: int = 0
    """Codistillation group id of this job's first group: 0 when one job holds every group
    (`transport: world`); `codistill.group_id` when each group is its own job (`torchft`)."""

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise TopologyError(f"codistill.groups must be >= 1, got {self.groups}")
        if self.world_size % self.groups:
            raise TopologyError(
                f"world size {self.world_size} is not divisible by codistill.groups={self.groups}"
            )
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(f"rank {self.rank} outside world of {self.world_size}")

    @property
    def group_size(self) -> int:
        """S: ranks that shard one replica."""
        return self.world_size // self.groups

    @property
    def group_id(self) -> int:
        return self.group_of(self.rank)

    def group_of(self, rank: int) -> int:
        """Codistillation group id of a rank of this job."""
        return self.first_group + rank // self.group_size

    @property
    def group_rank(self) -> int:
        """Rank inside my group; also the index of my rail."""
        return self.rank % self.group_size

    @property
    def is_leader(self) -> bool:
        return self.group_rank == 0

    def group_ranks(self, g: int) -> list[int]:
        g -= self.first_group
        return list(range(g * self.group_size, (g + 1) * self.group_size))

    def rail_ranks(self, r: int) -> list[int]:
        return [g * self.group_size + r for g in range(self.groups)]

    def leader_ranks(self) -> list[int]:
        return self.rail_ranks(0)

    def leader_of(self, g: int) -> int:
        return (g - self.first_group) * self.group_size


@dataclass
class Topology:
    """The layout plus the live process groups for this rank."""

    layout: Layout
    group: dist.ProcessGroup
    leaders: dist.ProcessGroup | None
    """None on non-leaders: they never talk across groups on the leaders route."""
    rail: dist.ProcessGroup
    model_parallel: dist.ProcessGroup
    """A real one-rank group: DeepSpeed all-reduces gradient norms over it."""
    exchange_group: dist.ProcessGroup
    """Same members as `group`, used only by the exchange: an asynchronous exchange runs its
    gathers on a background thread, and a process group must never carry collectives from two
    threads at once (ranks could pair them in different orders)."""
    total_groups: int | None = None
    """K when this job holds only one of the groups (`transport: torchft`); None: the layout's."""

    @property
    def groups(self) -> int:
        """K, the number of codistillation groups (in this job or across jobs)."""
        return self.total_groups if self.total_groups is not None else self.layout.groups

    @property
    def group_id(self) -> int:
        return self.layout.group_id

    @property
    def group_rank(self) -> int:
        return self.layout.group_rank

    @property
    def group_size(self) -> int:
        return self.layout.group_size

    @property
    def rank(self) -> int:
        return self.layout.rank


def build_topology(groups: int, exchange_backend: str | None = None) -> Topology:
    """Create every process group of the layout; collective over the whole world.

    `exchange_backend` ("nccl" | "gloo", None = the default group's) is given to the groups that
    carry the cross-group exchange only (leaders, rails, `exchange_group`): "gloo" sends the small
    exchange payload from host memory (across sites, or two groups on one GPU), while `group`
    keeps the default backends for ZeRO/FSDP traffic."""
    layout = Layout(dist.get_world_size(), groups, dist.get_rank())
    mine: dict[str, dist.ProcessGroup | None] = {
        "group": None, "leaders": None, "rail": None, "mp": None, "exchange": None}
    for key, backend in (("group", None), ("exchange", exchange_backend)):
        for g in range(layout.groups):
            pg = dist.new_group(layout.group_ranks(g), backend=backend)
            if g == layout.group_id:
                mine[key] = pg
    leaders = dist.new_group(layout.leader_ranks(), backend=exchange_backend)
    if layout.is_leader:
        mine["leaders"] = leaders
    for r in range(layout.group_size):
        pg = dist.new_group(layout.rail_ranks(r), backend=exchange_backend)
        if r == layout.group_rank:
            mine["rail"] = pg
    for rank in range(layout.world_size):
        pg = dist.new_group([rank])
        if rank == layout.rank:
            mine["mp"] = pg
    return Topology(layout, mine["group"], mine["leaders"], mine["rail"], mine["mp"], mine["exchange"])


def build_group_job_topology(group_id: int, groups: int) -> Topology:
    """The topology of a job that is one codistillation group (`transport: torchft`).

    The whole world is my group (ZeRO/FSDP shard over all of it, so DeepSpeed's world-wide
    barriers touch no other group); the cross-group links are not process groups of this job
    but torchft quorums (`ft_transport.py`). Collective over the world, like `build_topology`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = Layout(world, 1, rank, first_group=group_id)
    group = dist.new_group(list(range(world)))
    exchange_group = dist.new_group(list(range(world)))
    mine = None
    for r in range(world):
        pg = dist.new_group([r])
        if r == rank:
            mine = pg
    return Topology(layout, group, None, mine, mine, exchange_group, total_groups=groups)


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
        return self._t.group

    def get_data_parallel_world_size(self) -> int:
        return self._t.group_size

    def get_data_parallel_rank(self) -> int:
        return self._t.group_rank

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._t.model_parallel

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    # Newer DeepSpeed code paths ask for the tensor-parallel names.
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
