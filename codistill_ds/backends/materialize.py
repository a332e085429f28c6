"""Build a replica sharded over its group from the start: no rank ever holds the whole model.

ZeRO-3 and FSDP2 exist so that a model larger than one rank's memory can train; building it
whole on every rank and sharding it afterwards caps the size at one rank again (docs/design.md, "GPU
notes"). Here each module is built under `deepspeed.zero.Init` over my *group's* process group
(never the world: the groups train different replicas) and partitioned as soon as its
constructor returns, so a rank holds 1/S of the model plus the module being built.

Exact initialization. A Hugging Face model draws its weights twice: each layer's constructor
(`reset_parameters`), then `post_init` re-draws them module by module (`_init_weights`) once the
constructors of the whole (sub)model have run, when ZeRO has already partitioned them.
`group_init` runs that second pass on every rank of the group on each module's gathered
parameters (`GatheredParameters`, the group leader's copy kept), so every rank draws the same
random numbers in the same order as an unsharded construction with the same seed. On the CPU
the gathered weights equal `model.build_model(seed)` bit for bit (tests/dist/test_materialize.py).
On CUDA, zero.Init allocates each module on the GPU, so the draws come from the CUDA generator:
the values equal an unsharded construction on that GPU, not one on the CPU, and every rank of a
group holds the same replica because ZeRO broadcasts each new parameter from the group leader.

Transformers' own ZeRO-3 route (`from_config` under a ZeRO-3 TrainingArguments) differs on both
counts: it skips the constructors' draws and runs `_init_weights` on global rank 0 only, which
leaves every group but group 0 uninitialized (NaN; docs/design.md, "GPU notes"). `group_init` tells
Transformers that a zero.Init is already open, so it takes neither.

FSDP2 gets the same values: `fsdp_from_zero3` hands each rank's ZeRO partition to FSDP2 as its
local shard (the same rows whenever dim 0 divides by S, with no copy; otherwise one parameter is
gathered at a time), so FSDP2 and ZeRO-3 replicas of one seed start identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from codistill_ds.distributed import comm
from codistill_ds.distributed import env as rankinfo


class UninitializedModelError(RuntimeError):
    """Some rank holds NaN/Inf parameters right after construction (a group never initialized)."""


def zero_init_config(ds_config: dict | None) -> dict:
    """What zero.Init reads from a DeepSpeed config (offload, quantization), built in fp32.

    Batch keys are reduced to the micro batch: DeepSpeed would check `train_batch_size` against
    the world size instead of the group's. fp16/bf16 are switched off so the constructors draw
    in fp32 (an explicit `dtype=` is ignored by DeepSpeed 0.19 on accelerators without fp16,
    the CPU among them); `cast_partitions` rounds the result once, as the engine does."""
    cfg = copy.deepcopy(ds_config or {})
    for key in ("train_batch_size", "optimizer", "scheduler"):
        cfg.pop(key, None)
    micro = cfg.get("train_micro_batch_size_per_gpu")
    cfg["train_micro_batch_size_per_gpu"] = micro if isinstance(micro, int) else 1
    if not isinstance(cfg.get("gradient_accumulation_steps", 1), int):
        cfg.pop("gradient_accumulation_steps")
    cfg["bf16"], cfg["fp16"] = {"enabled": False}, {"enabled": False}
    cfg.setdefault("zero_optimization", {})["stage"] = 3
    return cfg


def _init_scope(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters `_init_weights(module)` may write: its own and its direct children's (some
    models set `module.q_proj.weight` from the parent), as Transformers' ZeRO-3 variant gathers."""
    from transformers import PreTrainedModel

    params = list(module.parameters(recurse=False))
    for child in module.children():
        if not isinstance(child, PreTrainedModel):
            params.extend(child.parameters(recurse=False))
    return params


@contextmanager
def _gathered_hf_init() -> Iterator[None]:
    """`PreTrainedModel._initialize_weights` on gathered parameters, on every rank of the group.

    Every rank runs the init (so every rank's generator advances exactly as in an unsharded
    construction) and the group leader's result is kept (`modifier_rank=0` is a rank *within*
    the parameters' process group). Parameters already gathered by an outer context (the
    missing-keys pass of `from_pretrained`) are not gathered twice."""
    from deepspeed import zero
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def _initialize_weights(self, module, is_custom_code=False):
        if getattr(module, "_is_hf_initialized", False):
            return original(self, module, is_custom_code)
        params = [p for p in _init_scope(module) if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
        with zero.GatheredParameters(params, modifier_rank=0):
            return original(self, module, is_custom_code)

    PreTrainedModel._initialize_weights = _initialize_weights
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


@contextmanager
def _transformers_inside_zero_init() -> Iterator[None]:
    """Tell Transformers a zero.Init is open, so that `from_config`/`from_pretrained` under a
    ZeRO-3 TrainingArguments neither opens its own (over the world) nor skips the
    constructors' draws and initializes on global rank 0 only."""
    from transformers import modeling_utils

    with modeling_utils.set_zero3_state():
        yield


@contextmanager
def group_init(group: Any, ds_config: dict | None = None) -> Iterator[list[torch.nn.Parameter]]:
    """Modules constructed inside are ZeRO-3 partitioned over `group` as they are built, in fp32,
    initialized exactly (module docstring). Yields the list of parameters partitioned so far;
    collective over `group` (every rank of it must build the same modules)."""
    rankinfo.prepare_accelerator_env()
    rankinfo.skip_deepspeed_shm_op()
    import deepspeed

    built: list[torch.nn.Parameter] = []

    class RecordingInit(deepspeed.zero.Init):  # type: ignore[misc, valid-type]
        def _zero_init_param(self, param):
            super()._zero_init_param(param)
            built.append(param)

    with RecordingInit(data_parallel_group=group, config_dict_or_path=zero_init_config(ds_config)), \
            _gathered_hf_init(), _transformers_inside_zero_init():
        yield built


def cast_partitions(params: list[torch.nn.Parameter], dtype: torch.dtype) -> None:
    """Round fp32 ZeRO-3 partitions to `dtype` in place (the engine's bf16/fp16 parameters).

    DeepSpeed leaves a zero.Init model's dtype alone, so this is the one rounding step; an
    unsharded fp32 model handed to the engine is rounded the same way."""
    for p in params:
        if p.dtype.is_floating_point and p.dtype != dtype:
            p.ds_tensor.data = p.ds_tensor.data.to(dtype)
            p.data = torch.empty(0, dtype=dtype, device=p.data.device)


def build_zero3(build: Callable[[], torch.nn.Module], group: Any, ds_config: dict | None = None,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`build()` partitioned over `group` from its first parameter on, cast to `dtype`."""
    with group_init(group, ds_config) as built:
        model = build()
    cast_partitions(built, dtype)
    return model


# ---- FSDP2 ----------------------------------------------------------------------------------------

def _local_rows(param: torch.nn.Parameter, group: Any) -> torch.Tensor:
    """This rank's FSDP2 shard (rows chunk(dim 0, S)[r]) of a ZeRO-3 parameter.

    ZeRO splits the flattened parameter into S equal slices; when dim 0 divides by S those are
    FSDP2's row chunks, and the ZeRO partition becomes the shard without a copy. Otherwise the
    parameter is gathered alone (collective over the group: the choice depends on shapes only,
    so every rank takes the same branch) and the rows copied out."""
    from deepspeed import zero

    S, r = dist.get_world_size(group), dist.get_rank(group)
    shape = tuple(param.ds_shape)
    rows = shape[0]
    part = param.ds_tensor.data
    if rows % S == 0 and part.numel() * S == param.ds_numel:
        return part.view(rows // S, *shape[1:])
    chunk = -(-rows // S)
    with zero.GatheredParameters([param]):
        return param.data.view(shape)[r * chunk: min(rows, (r + 1) * chunk)].clone()


def fsdp_from_zero3(zero_model: torch.nn.Module, fsdp_model: torch.nn.Module, group: Any,
                    device: torch.device) -> torch.nn.Module:
    """Materialize `fsdp_model` (built on the meta device, then `fully_shard`ed over `group`)
    with the values of `zero_model` (the same architecture from `build_zero3` over `group`).

    Each shard is handed over with `load_state_dict(assign=True)`, FSDP2's own route for
    replacing sharded parameters; buffers (rotary tables) are copied whole."""
    from torch.distributed.tensor import DTensor

    zero_params = dict(zero_model.named_parameters())
    state = {}
    for name, p in fsdp_model.named_parameters():
        local = _local_rows(zero_params[name], group).to(device)
        state[name] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                         shape=p.shape, stride=p.stride())
    fsdp_model.load_state_dict(state, strict=False, assign=True)
    for name, buf in zero_model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        fsdp_model.get_submodule(owner)._buffers[leaf] = buf.to(device)
    if getattr(getattr(fsdp_model, "config", None), "tie_word_embeddings", False):
        fsdp_model.tie_weights()
    left = [n for n, p in fsdp_model.named_parameters() if _local(p).is_meta]
    if left:
        raise UninitializedModelError(f"parameters left on the meta device: {left[:5]}")
    return fsdp_model


# ---- checks -------------------------------------------------------------------------------------------

def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank stores of `p`: its ZeRO-3 partition, its FSDP2 shard, or `p` itself."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of parameters whose local part (this rank's shard) holds NaN or Inf; one sync."""
    named = [(n, _local(p)) for n, p in model.named_parameters()]
    named = [(n, t) for n, t in named if t.numel()]
    if not named:
        return []
    bad = torch.stack([~torch.isfinite(t.detach()).all() for _, t in named]).cpu().tolist()
    return [n for (n, _), b in zip(named, bad) if b]


def check_initialized(model: torch.nn.Module, group: Any = None) -> None:
    """Raise `UninitializedModelError` on every rank of `group` (default: the world) if any of
    them holds a non-finite parameter shard: one pass over local shards and one small gather,
    cheap enough to run right after construction, before training or the first exchange
    could spread the NaN to the peers."""
    mine = (dist.get_rank(), nonfinite_parameters(model))
    bad = [(rank, names) for rank, names in comm.all_gather_object(mine, group) if names]
    if bad:
        detail = "; ".join(f"rank {rank}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                           for rank, names in bad)
        raise UninitializedModelError(f"non-finite parameters right after construction on "
                                      f"{len(bad)} rank(s): {detail}")


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of every parameter (collective over each parameter's group):
    what tests compare with an unsharded construction."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):
            from deepspeed import zero

            with zero.GatheredParameters([p]):
                out[name] = p.data.detach().float().cpu().clone()
        elif hasattr(p, "full_tensor"):
            out[name] = p.full_tensor().detach().float().cpu()
        else:
            out[name] = p.detach().float().cpu().clone()
    return out
