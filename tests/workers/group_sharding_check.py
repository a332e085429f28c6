"""Rank program: the hooks that make Accelerate-style engine creation shard inside a group.

Calls `fully_shard(module, mesh=None)` and `deepspeed.initialize(...)` without an mpu, exactly
as Accelerate 1.15 does, inside `engines_in_group`; then falls into the global-`groups.mpu` trap
on purpose and records whether `check_engine_in_group` catches it. Also exercises the loader,
dataset and gather helpers the Trainer mixin uses, and `check_same_exchange_data` on equal, then
different exchange rows (rank 3's middle row differs). Args: OUT. Writes OUT/rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codistill_ds.backends.model import build_model
from codistill_ds.config import ConfigError, ModelConfig
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.distributed.topology import GroupMPU, world_topology
from codistill_ds.integrations.exchange_data import check_same_exchange_data
from codistill_ds.integrations.group_sharding import (
    GroupShardingError,
    check_engine_in_group,
    check_fsdp_in_group,
    engines_in_group,
    gather_in_group,
    group_shard,
    reshard_loader,
    zero3_init_in_group,
)

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)


def fsdp_facts(t) -> dict:
    import torch.distributed.fsdp as fsdp_module

    original = fsdp_module.fully_shard
    model = build_model(TINY, 256, 0.0, 1)
    with engines_in_group(t, use_deepspeed=False, fsdp_mesh=t.shard_mesh("cpu")):
        from torch.distributed.fsdp import (
            fully_shard,  # looked up at call time, as Accelerate does
        )

        for block in model.model.layers:
            fully_shard(block, mesh=None, reshard_after_forward=True)
        fully_shard(model, mesh=None)
    p = model.model.embed_tokens.weight
    check_fsdp_in_group(model, t)  # every parameter on my group's mesh: passes
    return {"fsdp_mesh_size": p.device_mesh.size(), "fsdp_local_rows": int(p.to_local().shape[0]),
            "fsdp_rows": int(p.shape[0]), "fsdp_restored": fsdp_module.fully_shard is original,
            "fsdp_refused": [_fsdp_refused(t, on_world) for on_world in (True, False)]}


def _fsdp_refused(t, on_world: bool) -> str | None:
    """The per-parameter check on a model sharded over the whole world, or in-group with its
    last block alone left out of `fully_shard`: the message, or None if it passed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model(TINY, 256, 0.0, 1)
    if on_world:
        fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    else:
        mesh = t.shard_mesh("cpu")
        for module in (model.model.embed_tokens, *model.model.layers[:-1], model.model.norm, model.lm_head):
            fully_shard(module, mesh=mesh)
    try:
        check_fsdp_in_group(model, t)
    except GroupShardingError as err:
        return str(err)
    return None


def ds_config() -> dict:
    # What Accelerate hands DeepSpeed: the Trainer's world-sized train_batch_size (2 x 1 x 4).
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 8,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True}


def deepspeed_facts(t) -> dict:
    import deepspeed
    import deepspeed.utils.groups as ds_groups

    model = build_model(TINY, 256, 0.0, 1)
    config = ds_config()
    with engines_in_group(t, use_deepspeed=True):
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config_params=config)
    p = next(engine.module.parameters())
    facts = {"ds_dp_size": engine.dp_world_size, "ds_local": int(p.ds_tensor.numel()), "ds_full": int(p.ds_numel),
             "ds_train_batch_size": engine.train_batch_size(), "ds_config_batch": config["train_batch_size"]}
    # The trap: DeepSpeed's global mpu, no mpu argument. The check must refuse the engine.
    ds_groups.mpu = GroupMPU(t)
    try:
        model = build_model(TINY, 256, 0.0, 1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config_params=ds_config())  # DeepSpeed checks 8 = 2 x 1 x world
        p = next(engine.module.parameters())
        facts.update(trap_dp_size=engine.dp_world_size, trap_local=int(p.ds_tensor.numel()))
        check_engine_in_group(engine, t)
        facts["trap_caught"] = False
    except GroupShardingError as err:
        facts.update(trap_caught=True, trap_message=str(err))
    finally:
        ds_groups.mpu = None
    return facts


def zero_init_facts(t) -> dict:
    """Transformers builds ZeRO-3 models inside `deepspeed.zero.Init(config_dict_or_path=...)`."""
    import deepspeed

    with zero3_init_in_group(t), deepspeed.zero.Init(config_dict_or_path=ds_config()):
        model = build_model(TINY, 256, 0.0, 1)
    p = next(model.parameters())
    facts = {"zinit_group_size": dist.get_world_size(p.ds_process_group), "zinit_local": int(p.ds_tensor.numel()),
             "zinit_restored": deepspeed.zero.Init.__name__ == "Init"}
    with deepspeed.zero.Init(config_dict_or_path=ds_config()):
        world_model = build_model(TINY, 256, 0.0, 1)
    try:
        with engines_in_group(t, use_deepspeed=True):
            deepspeed.initialize(model=world_model, optimizer=torch.optim.AdamW(world_model.parameters()),
                                 config_params=ds_config())
        facts["zinit_world_caught"] = False
    except GroupShardingError:
        facts["zinit_world_caught"] = True
    return facts


def helper_facts(t) -> dict:
    from accelerate.data_loader import BatchSamplerShard
    from datasets import Dataset

    world = dist.get_world_size()
    sampler = BatchSamplerShard(torch.utils.data.BatchSampler(range(12), 2, False),
                                num_processes=world, process_index=dist.get_rank())
    loader = reshard_loader(torch.utils.data.DataLoader(list(range(12)), batch_sampler=sampler), t)
    rows = group_shard(Dataset.from_dict({"x": list(range(10))}), t.group_id, t.groups)
    gathered = gather_in_group(torch.tensor([float(dist.get_rank())]), t)
    return {"loader": [b.tolist() for b in loader], "shard_rows": list(rows["x"]),
            "list_rows": list(group_shard(list(range(10)), t.group_id, t.groups)),
            "gathered": gathered.tolist()}


def exchange_data_facts(t) -> dict:
    """The Trainer's exchange-data check over the 2 x 2 layout: equal rows pass; with the middle
    row different on the last rank, every rank raises (the message, or None if it passed)."""
    rows = [{"input_ids": [i, i + 1]} for i in range(10)]
    check_same_exchange_data(rows, t.dims)  # equal everywhere: passes
    if t.rank == dist.get_world_size() - 1:
        rows[5] = {"input_ids": [0, 0]}
    try:
        check_same_exchange_data(rows, t.dims)
    except ConfigError as err:
        return {"exchange_data_raised": str(err)}
    return {"exchange_data_raised": None}


def main() -> None:
    out = Path(sys.argv[1])
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    t = world_topology(2)
    result = {"rank": t.rank, "group": t.group_id, "group_rank": t.position}
    result.update(fsdp_facts(t))
    result.update(deepspeed_facts(t))
    result.update(zero_init_facts(t))
    result.update(helper_facts(t))
    result.update(exchange_data_facts(t))
    (out / f"rank{t.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()
