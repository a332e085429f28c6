"""DeepSpeed AutoTP (ZeRO-0/1/2, `tensor_parallel.autotp_size`) inside one codistillation group.

The trap (measured with DeepSpeed 0.19.8, docs/design.md): `deepspeed.initialize(..., mpu=...)` with
`tensor_parallel.autotp_size > 1` replaces the engine's mpu by the module
`deepspeed.utils.groups` (`DeepSpeedEngine._configure_tensor_parallel_states`: `self.mpu =
groups`), and `groups._init_tp_mesh_device` then builds (data_parallel, tensor_parallel) groups
over the WHOLE world, unless `groups._TENSOR_MODEL_PARALLEL_GROUP` is already set. With K
codistillation groups, ZeRO's data-parallel group then spans the groups (ranks t, t+T, t+2T, ...
of the world) and group 1 trains group 0's weights, silently.

What 0.19.8 reads afterwards, all through `groups` (engine.py, runtime/utils.py, zero/, module_inject/):
- `_TENSOR_MODEL_PARALLEL_GROUP`: AutoTP's layers (`tp_config.tp_group`, `AutoTP.mp_group`),
  the dataloader consistency check, the TP RNG broadcast;
- `_MODEL_PARALLEL_GROUP`: `get_model_parallel_*` (gradient-norm all-reduces, checkpoint rank);
- `_DATA_PARALLEL_GROUP`: through `groups.mpu = groups` -> `groups._get_data_parallel_group()`
  -> `groups.get_data_parallel_group()`: the engine's data-parallel and sequence-data-parallel
  groups, hence ZeRO-1/2's partition and reduction group, and the clip's averaging group;
- `_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE/_RANK`: overrides, left None;
- `groups.mesh_device` would take precedence over all of these: it must be None;
- `get_tensor_model_parallel_src_rank()` = (global rank // T) * T: right only when the TP ranks
  are innermost and contiguous in the global numbering (global rank g*S + a*T + t).

`initialize_autotp` sets those globals to my group's own TP and DP process groups before
`deepspeed.initialize`, passes an mpu that reports the same groups (DeepSpeedConfig sizes the
batch from its data-parallel world size), and refuses to return an engine whose groups are not
exactly mine (`check_engine_groups`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class AutoTPGroupError(RuntimeError):
    """DeepSpeed's AutoTP groups are not my codistillation group's own."""


def autotp_groups_from_mesh(mesh: Any) -> tuple[Any, Any]:
    """(TP group, data-parallel group) of this rank from a ("codistill", "replicate",
    "dp_shard", "tp") mesh: mesh["tp"], and (replicate, dp_shard) flattened (ZeRO-1/2 has no
    HSDP: its data-parallel group is all A = R*D data ranks of my group)."""
    return mesh["tp"].get_group(), mesh["replicate", "dp_shard"]._flatten("autotp_dp").get_group()


class AutoTPGroupMPU:
    """The `mpu` given to `deepspeed.initialize`: my group's data-parallel group (A ranks) and
    TP group (T ranks). DeepSpeedConfig takes its data-parallel world size from here before the
    engine swaps its mpu for `deepspeed.utils.groups` (which `install_group_globals` points at
    the same groups). No `initialize_sequence_parallel` attribute (DeepSpeed would then return
    no data-parallel group)."""

    def __init__(self, tp_group: Any, dp_group: Any) -> None:
        self._tp, self._dp = tp_group, dp_group

    def get_data_parallel_group(self) -> Any:
        return self._dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_model_parallel_group(self) -> Any:
        return self._tp

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._tp)

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._tp)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self._tp, 0)


def _ranks(group: Any) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def check_tp_contiguous(tp_group: Any) -> None:
    """DeepSpeed's TP source rank is (global rank // T) * T: my TP group must be exactly the T
    consecutive global ranks starting there (TP innermost and contiguous)."""
    T, rank = dist.get_world_size(tp_group), dist.get_rank()
    base = (rank // T) * T
    if _ranks(tp_group) != list(range(base, base + T)):
        raise AutoTPGroupError(f"AutoTP needs the TP ranks innermost and contiguous: DeepSpeed takes rank "
                               f"{base} = ({rank} // {T}) * {T} as the TP source of rank {rank}, but its TP "
                               f"group is ranks {_ranks(tp_group)}")


def install_group_globals(tp_group: Any, dp_group: Any) -> None:
    """Point `deepspeed.utils.groups` at my group's TP and DP process groups (module docstring
    lists what reads them). Call before `deepspeed.initialize`; `_init_tp_mesh_device` then
    builds no world-wide groups (it returns early once a TP group is set)."""
    from deepspeed.utils import groups

    check_tp_contiguous(tp_group)
    if getattr(groups, "mesh_device", None) is not None:
        raise AutoTPGroupError("deepspeed.utils.groups.mesh_device is set (a mesh_param/mesh_device was given "
                               "to DeepSpeed): it overrides the data-parallel group; do not combine it with "
                               "codistillation groups")
    groups._TENSOR_MODEL_PARALLEL_GROUP = tp_group
    groups._MODEL_PARALLEL_GROUP = tp_group
    groups._DATA_PARALLEL_GROUP = dp_group
    groups._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = None
    groups._MPU_TENSOR_MODEL_PARALLEL_RANK = None


def clear_group_globals() -> None:
    """Forget the TP/DP globals (before building another engine with other groups)."""
    from deepspeed.utils import groups

    groups._TENSOR_MODEL_PARALLEL_GROUP = None
    groups._MODEL_PARALLEL_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = None
    groups._MPU_TENSOR_MODEL_PARALLEL_RANK = None
    groups.mpu = None


def engine_groups(engine: Any) -> dict[str, list[int]]:
    """The ranks of every data-parallel and TP group the engine and its layers use."""
    from deepspeed.utils import groups

    found: dict[str, list[int]] = {
        "engine.data_parallel_group": _ranks(engine.data_parallel_group),
        "engine.seq_data_parallel_group": _ranks(engine.seq_data_parallel_group),
        "groups._get_data_parallel_group()": _ranks(groups._get_data_parallel_group()),
        "groups.get_tensor_model_parallel_group()": _ranks(groups.get_tensor_model_parallel_group()),
        "groups.get_model_parallel_group()": _ranks(groups.get_model_parallel_group()),
    }
    optimizer = getattr(engine, "optimizer", None)
    for i, g in enumerate(getattr(optimizer, "real_dp_process_group", None) or []):
        found[f"ZeRO real_dp_process_group[{i}]"] = _ranks(g)
    if getattr(optimizer, "dp_process_group", None) is not None:
        found["ZeRO dp_process_group"] = _ranks(optimizer.dp_process_group)
    layer_groups = {tuple(_ranks(m.mp_group)) for m in engine.module.modules()
                    if getattr(m, "mp_group", None) is not None and hasattr(m, "tp_world_size")}
    for ranks in sorted(layer_groups):
        found[f"AutoTP layer mp_group {list(ranks)}"] = list(ranks)
    return found


def check_engine_groups(engine: Any, tp_group: Any, dp_group: Any) -> dict[str, list[int]]:
    """Raise `AutoTPGroupError` unless every data-parallel group of the engine is exactly my
    group's data-parallel ranks and every TP group exactly my TP ranks; returns what was checked."""
    want_dp, want_tp = _ranks(dp_group), _ranks(tp_group)
    found = engine_groups(engine)
    wrong = []
    for what, ranks in found.items():
        tp_kind = "tensor_model" in what or "model_parallel" in what or "mp_group" in what
        want = want_tp if tp_kind else want_dp
        if ranks != want:
            wrong.append(f"{what} is ranks {ranks}, expected {want}")
    if engine.dp_world_size != len(want_dp):
        wrong.append(f"engine.dp_world_size is {engine.dp_world_size}, expected {len(want_dp)}")
    if wrong:
        raise AutoTPGroupError(
            "DeepSpeed AutoTP groups are not this codistillation group's own (a data-parallel group "
            "spanning groups makes one group train another's weights): " + "; ".join(wrong))
    return found


def initialize_autotp(model: torch.nn.Module, optimizer: Any, ds_config: dict, *, tp_group: Any, dp_group: Any,
                      install_groups: bool = True) -> Any:
    """`deepspeed.initialize` with AutoTP over my group's `tp_group` and ZeRO over `dp_group`;
    returns the engine after `check_engine_groups` (refuses to run otherwise).

    `ds_config` must ask for `tensor_parallel.autotp_size` = T and ZeRO stage 0, 1 or 2 (AutoTP
    replicates the whole model on every rank before splitting it: build it whole here, not under
    zero.Init). `install_groups=False` leaves DeepSpeed's default grouping (for tests: the check
    must then fail whenever there is more than one codistillation group)."""
    import deepspeed

    T = dist.get_world_size(tp_group)
    size = (ds_config.get("tensor_parallel") or {}).get("autotp_size")
    if size != T:
        raise ValueError(f"ds_config tensor_parallel.autotp_size is {size}, but the TP group has {T} ranks")
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"AutoTP here supports ZeRO stages 0, 1 and 2, got {stage}")
    if install_groups:
        install_group_globals(tp_group, dp_group)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      mpu=AutoTPGroupMPU(tp_group, dp_group), dist_init_required=False)
    check_engine_groups(engine, tp_group, dp_group)
    return engine
