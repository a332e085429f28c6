"""The named axes (`ParallelDims`) against a layout enumerated by brute force.

For every (K, R, D, T) up to 16 ranks: each rank's coordinates come from the mesh tensor
`arange(W).view(K, R, D, T)` (torch's own row-major layout, TP innermost), every role derives
from them, and the process-group rank lists partition the world the way the DeviceMesh slices it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from codistill_ds.distributed.axes import AXES, ParallelDims, TopologyError

SHAPES = [s for s in itertools.product(range(1, 4), repeat=4) if s[0] * s[1] * s[2] * s[3] <= 16]


@pytest.mark.parametrize("shape", SHAPES)
def test_roles_match_the_mesh_tensor(shape):
    K, R, D, T = shape
    W = K * R * D * T
    mesh = torch.arange(W).view(K, R, D, T)
    for rank in range(W):
        dims = ParallelDims(world_size=W, groups=K, rank=rank, replicate=R, tp=T)
        g, r, d, t = (int(i) for i in (mesh == rank).nonzero()[0])
        assert dims.shape == shape and dims.group_size == R * D * T and dims.dp_shard == D
        assert dims.coords() == (g, r, d, t)
        assert dims.group_id == g and dims.position == rank - g * R * D * T
        assert dims.data_rank == r * D + d and dims.data_size == R * D and dims.tp_rank == t
        assert dims.rank_of(g, r, d, t) == rank
        # the process group along each axis is the mesh's slice through this rank
        slices = {"codistill": mesh[:, r, d, t], "replicate": mesh[g, :, d, t],
                  "dp_shard": mesh[g, r, :, t], "tp": mesh[g, r, d, :]}
        for axis in AXES:
            assert dims.axis_ranks(axis) == slices[axis].tolist(), axis
        assert dims.rail_ranks(dims.position) == slices["codistill"].tolist()
        assert dims.data_parallel_ranks() == mesh[g, :, :, t].flatten().tolist()
        assert dims.group_ranks(g) == mesh[g].flatten().tolist()


@pytest.mark.parametrize("shape", [(2, 1, 2, 2), (1, 2, 1, 2), (2, 2, 1, 1), (1, 1, 4, 1)])
def test_axis_partitions_cover_the_world_once(shape):
    K, R, D, T = shape
    dims = ParallelDims(world_size=K * R * D * T, groups=K, rank=0, replicate=R, tp=T)
    for axis in AXES:
        parts = dims.axis_partitions(axis)
        assert sorted(r for p in parts for r in p) == list(range(dims.world_size)), axis
        assert all(len(p) == dict(zip(AXES, shape))[axis] for p in parts), axis


def test_tp_ranks_of_a_data_rank_read_the_same_tokens():
    """The T ranks that differ only in t have the same data rank; data ranks are 0..A-1."""
    for rank in range(16):
        dims = ParallelDims(world_size=16, groups=2, rank=rank, replicate=2, tp=2)
        others = [ParallelDims(world_size=16, groups=2, rank=o, replicate=2, tp=2) for o in dims.axis_ranks("tp")]
        assert {o.data_rank for o in others} == {dims.data_rank}
    assert sorted({ParallelDims(world_size=16, groups=2, rank=r, replicate=2, tp=2).data_rank
                   for r in range(8)}) == [0, 1, 2, 3]


def test_a_job_of_one_group_counts_from_its_group_id():
    """transport torchft: the job is group 3 of 5; ranks are 0..S-1 of its own world."""
    dims = ParallelDims(world_size=4, groups=1, rank=3, tp=2, first_group=3, total_groups=5)
    assert dims.group_id == 3 and dims.codistill_groups == 5 and dims.group_ranks(3) == [0, 1, 2, 3]
    assert dims.coords() == (3, 0, 1, 1) and dims.leader_of(3) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"world_size": 6, "groups": 4, "rank": 0}, "world size 6 is not divisible by codistill.groups=4"),
    ({"world_size": 8, "groups": 2, "rank": 0, "tp": 3},
     ("a group of 4 ranks (world 8 / codistill.groups 2) is not divisible by parallel.replicate 1 x "
      "parallel.tp 3 = 3: world = codistill 2 x replicate 1 x dp_shard D x tp 3 needs D = 1.33333")),
    ({"world_size": 8, "groups": 2, "rank": 0, "replicate": 2, "tp": 4}, "parallel.replicate 2 x parallel.tp 4 = 8"),
    ({"world_size": 8, "groups": 0, "rank": 0}, "codistill.groups must be >= 1, got 0"),
    ({"world_size": 8, "groups": 2, "rank": 0, "tp": 0}, "parallel.tp must be >= 1, got 0"),
    ({"world_size": 4, "groups": 2, "rank": 4}, "rank 4 outside world of 4"),
])
def test_bad_degrees_name_every_number(kwargs, message):
    with pytest.raises(TopologyError) as err:
        ParallelDims(**kwargs)
    assert message in str(err.value)


def test_describe_names_each_axis():
    dims = ParallelDims(world_size=16, groups=2, rank=0, replicate=2, tp=2)
    assert dims.describe() == "codistill 2 x replicate 2 x dp_shard 2 x tp 2 = 16 ranks"
