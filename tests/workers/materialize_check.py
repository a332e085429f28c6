"""Rank program: replicas built sharded over their group (materialize.py, the HF ZeRO-3 hook).

4 ranks = 2 groups x 2. Each group builds with its own seed, and every check compares the
gathered weights with an unsharded construction of that seed computed on the same rank:
  zero3      materialize.build_zero3 (the CLI's ZeRO-3 path), fp32 and bf16
  fsdp       fsdp_backend.build_sharded (the CLI's FSDP2 path), with vocabulary 257 so that the
             embedding's rows do not split evenly (the gathered branch), plus a forward
  hf         `from_config` and `from_pretrained` inside group_sharding.zero3_init_in_group under
             a ZeRO-3 HfDeepSpeedConfig, the way a Trainer script builds its model
  checks     materialize.check_initialized with a NaN planted on rank 3 only; the partition
             check on a model whose second parameter only is partitioned over the world
Args: OUT. Writes OUT/rank{r}.json."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codistill_ds.backends.fsdp import build_sharded
from codistill_ds.backends.materialize import (
    UninitializedModelError,
    build_zero3,
    check_initialized,
    gathered_state_dict,
)
from codistill_ds.backends.model import ModelRecipe, build_hf_config, build_model
from codistill_ds.config import ModelConfig
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.distributed.topology import world_topology
from codistill_ds.integrations.group_sharding import (
    GroupShardingError,
    _check_not_partitioned_over_world,
    zero3_init_in_group,
)

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
VOCAB, SEED = 257, 11
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def max_diff(full: dict, ref: dict) -> float:
    assert full.keys() == ref.keys(), (sorted(full)[:3], sorted(ref)[:3])
    return max((full[k] - ref[k].float()).abs().max().item() for k in ref)


def reference(seed: int) -> dict:
    return {k: v.detach().float().clone() for k, v in build_model(TINY, VOCAB, 0.0, seed).named_parameters()}


def zero3_facts(t, seed: int, ref: dict) -> dict:
    model = build_zero3(lambda: build_model(TINY, VOCAB, 0.0, seed), t.group)
    parts = [(int(p.ds_tensor.numel()), int(p.ds_numel)) for p in model.parameters()]
    groups = {tuple(dist.get_process_group_ranks(p.ds_process_group)) for p in model.parameters()}
    check_initialized(model)
    half = build_zero3(lambda: build_model(TINY, VOCAB, 0.0, seed), t.group, dtype=torch.bfloat16)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in ref.items()}
    return {"zero3_diff": max_diff(gathered_state_dict(model), ref), "zero3_parts": parts,
            "zero3_groups": [list(g) for g in groups],
            "zero3_bf16_dtypes": sorted({str(p.dtype) for p in half.parameters()}),
            "zero3_bf16_diff": max_diff(gathered_state_dict(half), rounded),
            "checksum": float(sum(v.double().sum() for v in gathered_state_dict(model).values()))}


def fsdp_facts(t, seed: int, ref: dict) -> dict:
    mesh = t.shard_mesh("cpu")
    recipe = ModelRecipe(TINY, VOCAB, 0.0, seed)
    model = build_sharded(recipe, mesh, bf16=False, cpu_offload=False, reshard_after_forward=True,
                          device=torch.device("cpu"))
    check_initialized(model)
    embed = model.model.embed_tokens.weight
    ids = torch.arange(16).view(2, 8) % VOCAB
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        plain = build_model(TINY, VOCAB, 0.0, seed)(input_ids=ids).logits
    return {"fsdp_diff": max_diff(gathered_state_dict(model), ref), "fsdp_embed_rows": int(embed.to_local().shape[0]),
            "fsdp_logits_diff": (ours - plain).abs().max().item(),
            "fsdp_q_local_rows": int(model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0])}


def q_std(model) -> float:
    from deepspeed import zero

    w = model.model.layers[0].self_attn.q_proj.weight
    with zero.GatheredParameters([w]):
        return w.data.float().std().item()


def hf_facts(t, seed: int, out: Path) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf = build_hf_config(TINY, VOCAB, 0.0)
    hf._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    ref = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_config(hf).named_parameters()}
    pre_dir = out / "pretrained"
    if dist.get_rank() == 0:
        torch.manual_seed(99)
        AutoModelForCausalLM.from_config(hf).save_pretrained(pre_dir)
    dist.barrier()
    loaded_ref = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(pre_dir).named_parameters()}
    keep = HfDeepSpeedConfig(ZERO3)  # what TrainingArguments(deepspeed=zero3) sets up
    facts = {}
    try:
        torch.manual_seed(seed)
        with zero3_init_in_group(t):
            model = AutoModelForCausalLM.from_config(hf)
        check_initialized(model)
        facts.update(hf_config_diff=max_diff(gathered_state_dict(model), ref), hf_q_std=q_std(model))
        with zero3_init_in_group(t):
            model = AutoModelForCausalLM.from_pretrained(pre_dir)
        check_initialized(model)
        facts["hf_pretrained_diff"] = max_diff(gathered_state_dict(model), loaded_ref)
    finally:
        del keep
    return facts


def check_facts(t, seed: int) -> dict:
    import deepspeed

    model = build_zero3(lambda: build_model(TINY, VOCAB, 0.0, seed), t.group)
    if dist.get_rank() == 3:
        next(model.parameters()).ds_tensor.data[0] = float("nan")
    try:
        check_initialized(model)
        facts = {"nan_caught": ""}
    except UninitializedModelError as err:
        facts = {"nan_caught": str(err)}
    with deepspeed.zero.Init(data_parallel_group=t.group, config_dict_or_path=ZERO3):
        first = torch.nn.Linear(8, 8)
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):  # the world: the trap
        second = torch.nn.Linear(8, 8)
    try:
        _check_not_partitioned_over_world(torch.nn.Sequential(first, second), t)
        facts["second_param_caught"] = ""
    except GroupShardingError as err:
        facts["second_param_caught"] = str(err)
    return facts


def main() -> None:
    out = Path(sys.argv[1])
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    t = world_topology(2)
    seed = SEED + t.group_id
    ref = reference(seed)
    facts = {"rank": t.rank, "group": t.group_id, "half_numel": [math.ceil(v.numel() / 2) for v in ref.values()]}
    facts.update(zero3_facts(t, seed, ref))
    facts.update(fsdp_facts(t, seed, ref))
    facts.update(hf_facts(t, seed, out))
    facts.update(check_facts(t, seed))
    (out / f"rank{t.rank}.json").write_text(json.dumps(facts))
    dist.barrier()
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
