"""The named parallel axes of a codistillation job, as pure rank arithmetic.

A job's world is laid out on four axes (torchtitan's `ParallelDims`, with codistillation as the
outermost one):

    ("codistill", "replicate", "dp_shard", "tp") = (K, R, D, T)
    global rank = g*S + (r*D + d)*T + t,      S = R*D*T ranks per group
    data rank a = r*D + d of A = R*D          (who reads which tokens)

Groups are group-major and contiguous, so a group sits on whole nodes and its sharding traffic
stays on intra-node links; TP is innermost and contiguous, so it stays inside a node; HSDP's
replicas (R) are the outer axis inside a group, across its nodes. Every token stream is keyed
by the data rank: the T ranks of a data rank read the same tokens.

Naming: "group" alone always means a *codistillation* group (one replica); process groups
are `*_pg` or named by role (`Topology.group`, `.rail`, ...); an optimizer's param groups are
`param_groups`. A rank's three roles inside its group, which used to share the name "group
rank", are:

- its **position** in the group (0..S-1): the index of its rail, the slot of the exchange;
- its **data rank** (0..A-1): which tokens it reads;
- its **shard coordinates** (r, d, t): where FSDP/ZeRO and TP put it (the DeviceMesh).

No other module computes ranks: they ask this object (or `Topology`, which holds it).
"""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("codistill", "replicate", "dp_shard", "tp")
"""Mesh dimension names, outermost first."""


class TopologyError(ValueError):
    """Degrees that cannot be laid out on the world."""


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of every axis and this rank's place on them; validated on construction.

    Args:
        world_size: ranks in this job (all groups under `transport: world`, one group under
            `transport: torchft`).
        groups: K, codistillation groups in this job.
        rank: this process's global rank in the job.
        replicate: R, HSDP replicas inside a group (gradients all-reduced across them).
        tp: T, tensor-parallel ranks inside a group.
        first_group: codistillation id of this job's first group (the `group_id` of a
            torchft job; 0 when one job holds every group).
        total_groups: K across jobs when this job holds one group of several (torchft).
    """

    world_size: int
    groups: int
    rank: int
    replicate: int = 1
    tp: int = 1
    first_group: int = 0
    total_groups: int | None = None

    def __post_init__(self) -> None:
        K, R, T, W = self.groups, self.replicate, self.tp, self.world_size
        for name, value in (("codistill.groups", K), ("parallel.replicate", R), ("parallel.tp", T)):
            if value < 1:
                raise TopologyError(f"{name} must be >= 1, got {value}")
        if W % K:
            raise TopologyError(f"world size {W} is not divisible by codistill.groups={K}")
        S = W // K
        if S % (R * T):
            raise TopologyError(
                f"a group of {S} ranks (world {W} / codistill.groups {K}) is not divisible by "
                f"parallel.replicate {R} x parallel.tp {T} = {R * T}: world = codistill {K} x "
                f"replicate {R} x dp_shard D x tp {T} needs D = {S / (R * T):g} to be a whole number")
        if not 0 <= self.rank < W:
            raise TopologyError(f"rank {self.rank} outside world of {W}")

    # ---- degrees ------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """S = R x D x T: ranks that hold one replica."""
        return self.world_size // self.groups

    @property
    def dp_shard(self) -> int:
        """D: ranks that shard one replica's parameters (FSDP / ZeRO), per replica and TP rank."""
        return self.group_size // (self.replicate * self.tp)

    @property
    def data_size(self) -> int:
        """A = R x D: ranks of a group that read different tokens."""
        return self.replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(K, R, D, T) in the order of `AXES`."""
        return (self.groups, self.replicate, self.dp_shard, self.tp)

    @property
    def codistill_groups(self) -> int:
        """K, the number of codistillation groups (in this job or across jobs)."""
        return self.total_groups if self.total_groups is not None else self.groups

    def describe(self) -> str:
        K, R, D, T = self.shape
        return f"codistill {K} x replicate {R} x dp_shard {D} x tp {T} = {self.world_size} ranks"

    # ---- where a rank sits ----------------------------------------------------------------
    def coords(self, rank: int | None = None) -> tuple[int, int, int, int]:
        """(g, r, d, t) of a rank of this job, g counted from `first_group`."""
        rank = self.rank if rank is None else rank
        _, _, D, T = self.shape
        g, pos = divmod(rank, self.group_size)
        r, rest = divmod(pos, D * T)
        d, t = divmod(rest, T)
        return (self.first_group + g, r, d, t)

    def rank_of(self, g: int, r: int, d: int, t: int) -> int:
        _, _, D, T = self.shape
        return (g - self.first_group) * self.group_size + (r * D + d) * T + t

    @property
    def group_id(self) -> int:
        return self.group_of(self.rank)

    def group_of(self, rank: int) -> int:
        """Codistillation group id of a rank of this job."""
        return self.first_group + rank // self.group_size

    @property
    def position(self) -> int:
        """My place in my group (0..S-1): the index of my rail and of my exchange slot."""
        return self.rank % self.group_size

    @property
    def data_rank(self) -> int:
        """Which 1/A of my group's tokens I read (the T ranks of a data rank read the same)."""
        _, r, d, _ = self.coords()
        return r * self.dp_shard + d

    @property
    def tp_rank(self) -> int:
        return self.coords()[3]

    @property
    def is_leader(self) -> bool:
        """Position 0: the rank that writes my group's records and talks for it on `leaders`."""
        return self.position == 0

    # ---- rank lists (every rank builds every process group from these) ---------------------
    def group_ranks(self, g: int) -> list[int]:
        start = (g - self.first_group) * self.group_size
        return list(range(start, start + self.group_size))

    def rail_ranks(self, position: int) -> list[int]:
        """Rank `position` of every group of this job: the `codistill` axis of the mesh."""
        return [g * self.group_size + position for g in range(self.groups)]

    def leader_ranks(self) -> list[int]:
        return self.rail_ranks(0)

    def leader_of(self, g: int) -> int:
        return (g - self.first_group) * self.group_size

    def axis_ranks(self, axis: str, rank: int | None = None) -> list[int]:
        """The ranks that differ from `rank` only along `axis` (its process group on that axis)."""
        g, r, d, t = self.coords(rank)
        K, R, D, T = self.shape
        first = self.first_group
        if axis == "codistill":
            return [self.rank_of(first + k, r, d, t) for k in range(K)]
        if axis == "replicate":
            return [self.rank_of(g, k, d, t) for k in range(R)]
        if axis == "dp_shard":
            return [self.rank_of(g, r, k, t) for k in range(D)]
        if axis == "tp":
            return [self.rank_of(g, r, d, k) for k in range(T)]
        raise ValueError(f"unknown axis {axis!r}; axes are {AXES}")

    def data_parallel_ranks(self, rank: int | None = None) -> list[int]:
        """Ranks of my group with my TP rank: ZeRO's data-parallel group (R x D ranks)."""
        g, _, _, t = self.coords(rank)
        return [self.rank_of(g, r, d, t) for r in range(self.replicate) for d in range(self.dp_shard)]

    def axis_partitions(self, axis: str) -> list[list[int]]:
        """Every process group along `axis`, in a fixed order (new_group is world-collective)."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in range(self.world_size):
            seen.setdefault(tuple(self.axis_ranks(axis, rank)), None)
        return [list(ranks) for ranks in seen]
