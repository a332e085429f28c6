"""Make the engines and data loaders that Accelerate builds shard inside one codistillation group.

Accelerate (and so the Hugging Face Trainer) assumes the whole world is one data-parallel group
and has no field for a custom process group (DESIGN.md, "Platform facts"): it calls
`deepspeed.initialize(...)` without an `mpu`, FSDP2's `fully_shard(...)` without a mesh unless a
`ParallelismConfig` made one (and that one is HSDP: gradients all-reduced across replicas, which
is synchronous training, not codistillation), and shards data loaders over every rank. The
smallest hooks that fix this without forking Accelerate:

- `engines_in_group`: for the duration of engine creation, `deepspeed.initialize` gets
  `mpu=GroupMPU(topology)` and a group-sized `train_batch_size`, and `fully_shard` gets the
  topology's ("codistill", "shard") mesh's shard dimension. Both are module attributes that
  Accelerate looks up at call time, so swapping them for the `with` block is enough. Setting
  DeepSpeed's global `groups.mpu` instead is the documented trap (ZeRO-3 then partitions over
  the whole world), so the engine is checked after creation: partitions must be 1/S.
- `reshard_loader`: the `BatchSamplerShard` of a prepared loader serves my rank within my group
  (the Trainer itself does the same for its `BatchRebalanceSampler`).
- `group_shard`: group g trains on rows g, g+K, ... of the dataset (the library's own rule in
  `data.TrainStream`), so a plain Trainer on that shard is the exact reference of group g.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from .. import comm
from ..topology import GroupMPU, Topology


class GroupShardingError(RuntimeError):
    """An engine or loader that would span two codistillation groups."""


def group_shard(dataset: Any, group: int, groups: int) -> Any:
    """Rows group, group + K, ...: a `datasets.Dataset` stays one (the Trainer drops unused columns)."""
    if hasattr(dataset, "shard") and hasattr(dataset, "column_names"):
        return dataset.shard(num_shards=groups, index=group, contiguous=False)
    if not hasattr(dataset, "__len__"):
        raise TypeError("codistillation needs a map-style train_dataset (with __len__) so that every "
                        "group gets a disjoint, reproducible shard; got an iterable dataset")
    return torch.utils.data.Subset(dataset, range(group, len(dataset), groups))


def reshard_loader(loader: Any, topology: Topology) -> Any:
    """Serve rank `group_rank` of `group_size` instead of global rank of world size."""
    from accelerate.data_loader import BatchSamplerShard

    for attr in ("batch_sampler", "sampler"):
        shard = getattr(loader, attr, None)
        if isinstance(shard, BatchSamplerShard):
            shard.num_processes, shard.process_index = topology.group_size, topology.group_rank
            return loader
    raise GroupShardingError(
        f"cannot shard {type(loader).__name__} inside the codistillation group: expected Accelerate's "
        "BatchSamplerShard (a map-style dataset and dispatch_batches=False)")


def gather_in_group(data: Any, topology: Topology, gradient_state: Any = None) -> Any:
    """`Accelerator.gather_for_metrics` over my group only: evaluation metrics stay per group."""
    if data is None:
        return None
    if isinstance(data, (list, tuple)):
        return type(data)(gather_in_group(d, topology, gradient_state) for d in data)
    if isinstance(data, dict):
        return {k: gather_in_group(v, topology, gradient_state) for k, v in data.items()}
    t = data.contiguous() if data.dim() else data.reshape(1)
    out = torch.cat(comm.all_gather(t, group=topology.group))
    # Same truncation as gather_for_metrics: the last batch is padded to even sizes across ranks.
    if gradient_state is not None and gradient_state.end_of_dataloader and gradient_state.remainder > 0:
        out = out[: gradient_state.remainder]
    return out


@contextmanager
def engines_in_group(topology: Topology, use_deepspeed: bool, fsdp_mesh: Any = None) -> Iterator[None]:
    """Within the block, DeepSpeed engines and FSDP2 modules built by Accelerate shard over my group."""
    import torch.distributed.fsdp as fsdp_module

    deepspeed = None
    if use_deepspeed:
        import deepspeed
    saved_init = deepspeed.initialize if deepspeed is not None else None
    saved_shard = fsdp_module.fully_shard

    def initialize(*args: Any, **kwargs: Any):
        if kwargs.get("mpu") is not None:
            raise GroupShardingError("an mpu was already given (sequence parallelism?); codistillation "
                                     "needs DeepSpeed's mpu for the group and cannot combine them")
        model = kwargs.get("model", args[1] if len(args) > 1 else None)
        _check_not_partitioned_over_world(model, topology)
        _group_sized_batch(kwargs.get("config_params", kwargs.get("config")), topology.group_size)
        result = saved_init(*args, **{**kwargs, "mpu": GroupMPU(topology)})
        check_engine_in_group(result[0], topology)
        return result

    def fully_shard(module: Any, *args: Any, **kwargs: Any):
        if kwargs.get("mesh") is not None:
            raise GroupShardingError("fully_shard got a mesh (from a ParallelismConfig?); codistillation "
                                     "shards on its own ('codistill', 'shard') mesh")
        return saved_shard(module, *args, **{**kwargs, "mesh": fsdp_mesh})

    if deepspeed is not None:
        deepspeed.initialize = initialize
    if fsdp_mesh is not None:
        fsdp_module.fully_shard = fully_shard
    try:
        yield
    finally:
        if deepspeed is not None:
            deepspeed.initialize = saved_init
        fsdp_module.fully_shard = saved_shard


def _group_sized_batch(ds_config: Any, group_size: int) -> None:
    """DeepSpeed checks train_batch_size == micro * accumulation * dp size, and dp size is S now.

    Edited in place so that Accelerate's and the Trainer's view of the config stays the truth."""
    if not isinstance(ds_config, dict):
        raise GroupShardingError("codistillation needs the DeepSpeed config as a dict at engine creation")
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps", 1)
    if isinstance(micro, int) and isinstance(accum, int):
        ds_config["train_batch_size"] = micro * accum * group_size
    else:
        ds_config.pop("train_batch_size", None)


def _check_not_partitioned_over_world(model: Any, topology: Topology) -> None:
    """`from_pretrained`/`from_config` under a ZeRO-3 TrainingArguments partition over the world."""
    if model is None:
        return
    for p in model.parameters():
        group = getattr(p, "ds_process_group", None)
        if group is not None and dist.get_world_size(group) != topology.group_size:
            raise GroupShardingError(
                f"the model was partitioned by deepspeed.zero.Init over {dist.get_world_size(group)} "
                f"ranks, but a codistillation group has {topology.group_size}: build it with "
                "`with codistill.zero3_init():` (CodistillCallback) or before TrainingArguments")
        return


def check_engine_in_group(engine: Any, topology: Topology) -> None:
    """Fail loudly on the global-mpu trap: a ZeRO partition must be 1/S of its parameter."""
    S = topology.group_size
    if engine.dp_world_size != S:
        raise GroupShardingError(f"DeepSpeed data-parallel size is {engine.dp_world_size}, expected the "
                                 f"codistillation group size {S}")
    for p in engine.module.parameters():
        group = getattr(p, "ds_process_group", None)
        if group is not None and dist.get_world_size(group) != S:
            raise GroupShardingError(f"ZeRO-3 partitions over {dist.get_world_size(group)} ranks, not "
                                     f"the group's {S}: the groups would share one model")
        return


@contextmanager
def zero3_init_in_group(topology: Topology) -> Iterator[None]:
    """`deepspeed.zero.Init` (as Transformers calls it) partitions over my group, not the world."""
    import deepspeed

    saved = deepspeed.zero.Init

    class GroupInit(saved):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("data_parallel_group", topology.group)
            super().__init__(*args, **kwargs)

    deepspeed.zero.Init = GroupInit
    try:
        yield
    finally:
        deepspeed.zero.Init = saved
