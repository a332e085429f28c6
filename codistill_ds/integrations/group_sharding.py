"""Make the engines and data loaders that Accelerate builds shard inside one codistillation group.

Accelerate (and so the Hugging Face Trainer) assumes the whole world is one data-parallel group
and has no field for a custom process group (docs/design.md, "Platform facts"): it calls
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
- `shuffle_in_group`: the loader's shuffle generator comes from my group's leader, not global
  rank 0, and is not re-broadcast over the world every epoch.
- `group_shard`: group g trains on rows g, g+K, ... of the dataset (the library's own rule in
  `data.TrainStream`), so a plain Trainer on that shard is the exact reference of group g.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import GroupMPU, Topology


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
    """Serve data rank `data_rank` of `data_size` instead of global rank of world size."""
    from accelerate.data_loader import BatchSamplerShard

    for attr in ("batch_sampler", "sampler"):
        shard = getattr(loader, attr, None)
        if isinstance(shard, BatchSamplerShard):
            shard.num_processes, shard.process_index = topology.data_size, topology.data_rank
            return loader
    if topology.dims.world_size == 1:  # a one-rank job (one group per job): nothing to split
        return loader
    raise GroupShardingError(
        f"cannot shard {type(loader).__name__} inside the codistillation group: expected Accelerate's "
        "BatchSamplerShard (a map-style dataset and dispatch_batches=False)")


def shuffle_in_group(loader: Any, topology: Topology) -> None:
    """The shuffle order of a prepared loader, drawn from my group leader's generator.

    By default (`use_seedable_sampler=False`) Accelerate broadcasts the sampler's generator from
    global rank 0 over the whole world at the start of every epoch: a world-wide collective in
    every group's data path, and every group shuffling with group 0's seed. The ranks of a group
    must share one order (each takes its slice of the same batches), so the leader's generator
    is broadcast inside the group once; every rank then draws the same numbers from it, epoch
    after epoch. Other RNG types Accelerate would synchronize over the world are refused."""
    types = list(getattr(loader, "rng_types", None) or [])
    others = [t for t in types if str(getattr(t, "value", t)) != "generator"]
    if others:
        raise GroupShardingError(f"the Accelerator synchronizes RNG types {others} from global rank 0 over every "
                                 "group; codistillation groups keep their own: leave `rng_types` at its default")
    generator = getattr(loader, "synchronized_generator", None)
    if not types or generator is None:
        return
    state = generator.get_state()
    comm.broadcast(state, src=topology.dims.leader_of(topology.group_id), group=topology.group)
    generator.set_state(state)
    loader.rng_types = None


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
        _group_sized_batch(kwargs.get("config_params", kwargs.get("config")), topology.data_size)
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


def _partitioned_over_other_group(model: Any, topology: Topology) -> list[tuple[str, int]]:
    """(name, partition world size) of every ZeRO-3 parameter not partitioned over exactly my
    group: every parameter is checked, since a model can mix modules built in different ways."""
    mine = topology.dims.group_ranks(topology.group_id)
    wrong, checked = [], {}
    for name, p in model.named_parameters():
        group = getattr(p, "ds_process_group", None)
        if group is None:
            continue
        if group not in checked:
            checked[group] = dist.get_process_group_ranks(group) == mine
        if not checked[group]:
            wrong.append((name, dist.get_world_size(group)))
    return wrong


def _check_not_partitioned_over_world(model: Any, topology: Topology) -> None:
    """`from_pretrained`/`from_config` under a ZeRO-3 TrainingArguments partition over the world."""
    if model is None:
        return
    wrong = _partitioned_over_other_group(model, topology)
    if wrong:
        name, size = wrong[0]
        raise GroupShardingError(
            f"{len(wrong)} parameter(s) (first: {name}) were partitioned by deepspeed.zero.Init over "
            f"{size} ranks, but a codistillation group has {topology.group_size}: build the model "
            "with `with codistill.zero3_init():` (CodistillCallback, or Codistill in an own Accelerate loop) "
            "or before TrainingArguments")


def check_engine_in_group(engine: Any, topology: Topology) -> None:
    """Fail loudly on the global-mpu trap: every ZeRO partition must be 1/S of its parameter.

    ZeRO-3: each parameter's partition group; ZeRO-1/2: each optimizer parameter group's
    partition group (every parameter belongs to one), both compared with my group's ranks."""
    S = topology.group_size
    if engine.dp_world_size != S:
        raise GroupShardingError(f"DeepSpeed data-parallel size is {engine.dp_world_size}, expected the "
                                 f"codistillation group size {S}")
    wrong = _partitioned_over_other_group(engine.module, topology)
    if wrong:
        name, size = wrong[0]
        raise GroupShardingError(f"ZeRO-3 partitions {len(wrong)} parameter(s) (first: {name}) over "
                                 f"{size} ranks, not the group's {S}: the groups would share one model")
    mine = topology.dims.group_ranks(topology.group_id)
    groups = getattr(getattr(engine, "optimizer", None), "real_dp_process_group", None) or []
    outside = [(i, dist.get_world_size(g)) for i, g in enumerate(groups) if dist.get_process_group_ranks(g) != mine]
    if outside:
        i, size = outside[0]
        raise GroupShardingError(f"ZeRO-1/2 partitions {len(outside)} optimizer parameter group(s) (first: {i}) "
                                 f"over {size} ranks, not the group's {S}: the groups would share one model")


def check_fsdp_in_group(model: Any, topology: Topology) -> None:
    """Every FSDP2 parameter is sharded on a mesh whose process group is exactly my group.

    Checked per parameter: a module left out of `fully_shard`, or sharded on another mesh (a
    `ParallelismConfig`'s), would be replicated or shared across groups without any error."""
    mine = topology.dims.group_ranks(topology.group_id)
    wrong, checked = [], {}
    for name, p in model.named_parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is None:
            wrong.append((name, "not sharded"))
            continue
        if id(mesh) not in checked:
            ranks = dist.get_process_group_ranks(mesh.get_group()) if mesh.ndim == 1 else None
            checked[id(mesh)] = ranks == mine
        if not checked[id(mesh)]:
            wrong.append((name, f"mesh {mesh.mesh_dim_names} of {mesh.size()} ranks"))
    if wrong:
        name, what = wrong[0]
        raise GroupShardingError(f"{len(wrong)} FSDP2 parameter(s) (first: {name}, {what}) are not sharded over "
                                 f"exactly my codistillation group of {topology.group_size} ranks")


@contextmanager
def zero3_init_in_group(topology: Topology) -> Iterator[None]:
    """`from_config`/`from_pretrained` inside build every group's replica partitioned over that
    group and initialized (or loaded) in full, which Transformers' ZeRO-3 route does for
    global rank 0's group only (docs/design.md, "GPU notes"):

    - construction runs under `materialize.group_init` (zero.Init over my group, in fp32, with
      the init draws of an unsharded construction, so group g's weights equal
      `from_config` under `group_seed`), then partitions are rounded to the DeepSpeed
      config's bf16/fp16, as the engine would have;
    - `from_pretrained` reads and loads the checkpoint on every group's leader
      (`hf_zero3.loading_in_group`);
    - any `deepspeed.zero.Init` opened inside partitions over my group too.

    Afterwards `materialize.check_initialized(model)` checks every rank of every group."""
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    from codistill_ds.backends.materialize import cast_partitions, group_init
    from codistill_ds.integrations.hf_trainer.zero3 import loading_in_group

    saved = deepspeed.zero.Init

    class GroupInit(saved):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("data_parallel_group", topology.group)
            super().__init__(*args, **kwargs)

    ds_config = deepspeed_config()
    deepspeed.zero.Init = GroupInit
    try:
        with group_init(topology.group, ds_config) as built, loading_in_group(topology):
            yield
        cast_partitions(built, _engine_dtype(ds_config))
    finally:
        deepspeed.zero.Init = saved


def _engine_dtype(ds_config: dict | None) -> torch.dtype:
    """The parameter dtype DeepSpeed's engine uses for this config ("auto" counts as off here:
    the Trainer resolves it into the config before the model is built)."""
    def on(key: str) -> bool:
        return (ds_config or {}).get(key, {}).get("enabled") is True

    return torch.bfloat16 if on("bf16") else torch.float16 if on("fp16") else torch.float32
