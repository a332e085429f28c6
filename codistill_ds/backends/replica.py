"""Build a TP + FSDP replica on the meta device and fill each rank's shards, parameter by
parameter, so that no rank ever holds the whole model and every group equals its same-seed
unsharded build (docs/design.md, "Model parallelism inside a group")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from codistill_ds.backends.sharding import apply_fsdp
from codistill_ds.backends.tensor_parallel import (
    CHECKPOINT_PREFIX,
    apply_tensor_parallel,
)

# ---- materialization ---------------------------------------------------------------------------

def clean_name(name: str) -> str:
    """A parameter name as the unwrapped Hugging Face model spells it."""
    return name.replace(CHECKPOINT_PREFIX, "")


def group_process_group(mesh: DeviceMesh) -> Any:
    """The process group of my group's S ranks, flattened from mesh's (replicate, dp_shard, tp)
    dims (ZeRO-3 builds and DCP run over it)."""
    return mesh["replicate", "dp_shard", "tp"]._flatten("group").get_group()


def materialize(model: nn.Module, full_value: Callable[[str], torch.Tensor], device: torch.device,
                buffers: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace the (meta) parameters of a TP/FSDP-sharded model by their real shards.

    For each parameter, `full_value(name)` returns its whole unsharded value (name without the
    checkpoint-wrapper prefix); this rank keeps only its piece,
    `distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)` (a local cut, no
    communication; `_StridedShard` placements included), cloned so the full value can be freed
    before the next parameter. At most one full parameter is alive at a time. `buffers` (e.g.
    rotary tables, replicated) are set as given."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def piece(name: str, p: torch.Tensor) -> torch.Tensor:
        full = full_value(name).detach()
        if not isinstance(p, DTensor):
            return full.clone()  # not a view of something the caller keeps
        cut = distribute_tensor(full.to(dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        del full
        return cut.to_local().clone()

    return materialize_pieces(model, piece, device, buffers)


def materialize_pieces(model: nn.Module, piece: Callable[[str, torch.Tensor], torch.Tensor], device: torch.device,
                       buffers: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace the (meta) parameters of a TP/FSDP-sharded model by real values, one at a time.

    `piece(name, p)` returns what this rank holds of parameter `name` (without the
    checkpoint-wrapper prefix): for a DTensor `p` its local shard, for a plain `p` the whole
    value. The shards enter through `load_state_dict(assign=True)`, FSDP2's route for replacing
    sharded parameters; a shard of the wrong local shape is refused."""
    from torch.distributed.tensor import DTensor

    skeleton = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    state = {}
    for key, p in skeleton.items():
        if id(p) not in params:
            continue  # buffers, and the second name of a tied parameter (tied again below)
        params.discard(id(p))
        local = piece(clean_name(key), p).to(device=device, dtype=p.dtype)
        if isinstance(p, DTensor):
            if tuple(local.shape) != tuple(p.to_local().shape):
                raise ValueError(f"{clean_name(key)}: this rank's shard is {list(local.shape)}, expected "
                                 f"{list(p.to_local().shape)} for placements {p.placements}")
            state[key] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride())
        else:
            state[key] = local
        del local
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()
    for name, buf in (buffers or {}).items():
        owner = _find_owner(model, name)
        owner[0]._buffers[owner[1]] = buf.to(device)
    left = [n for n, p in model.named_parameters() if _local(p).is_meta]
    if left:
        from codistill_ds.backends.materialize import UninitializedModelError

        raise UninitializedModelError(f"parameters left on the meta device: {left[:5]}")
    return model


def _find_owner(model: nn.Module, clean: str) -> tuple[nn.Module, str]:
    """(module, leaf) for a buffer named without the checkpoint prefix."""
    wanted = clean
    for name, module in model.named_modules():
        prefix = clean_name(name)
        for leaf in module._buffers:
            if (f"{prefix}.{leaf}" if prefix else leaf) == wanted:
                return module, leaf
    raise KeyError(wanted)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def materialize_from_zero3(model: nn.Module, zero_model: nn.Module, device: torch.device) -> nn.Module:
    """Materialize `model` (meta skeleton, parallelized and fully_shard'ed) from `zero_model`,
    the same architecture built by `materialize.build_zero3` over my group (every rank holds
    1/S of it, initialized exactly as an unsharded build of the same seed).

    One parameter at a time is gathered over the group (`GatheredParameters`), cut to this
    rank's TP/FSDP piece, and its ZeRO-3 partition is freed at once (`zero_model` is consumed:
    do not use it afterwards), so the ZeRO partitions shrink as the TP/FSDP shards grow: a
    rank holds about 1/S of the model (1/(D*T) under HSDP) plus one whole parameter and its
    clone while cutting, never the whole model."""
    from deepspeed import zero

    zero_params = dict(zero_model.named_parameters())

    def full_value(name: str) -> torch.Tensor:
        zp = zero_params[name]
        with zero.GatheredParameters([zp]):
            full = zp.data.view(tuple(zp.ds_shape)).clone()
        zp.ds_tensor.data = torch.empty(0, dtype=zp.ds_tensor.dtype, device=zp.ds_tensor.device)
        return full

    buffers = {n: b for n, b in zero_model.named_buffers()}
    return materialize(model, full_value, device, buffers)


def build_parallel_replica(build: Callable[[], nn.Module], *, tp_mesh: DeviceMesh | None, dp_mesh: DeviceMesh,
                           group: Any, activation_checkpointing: str = "none",
                           param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
                           reshard_after_forward: bool = True, cpu_offload: bool = False,
                           device: torch.device | None = None, weights: Any = None) -> nn.Module:
    """A replica TP-sharded over `tp_mesh` and FSDP/HSDP-sharded over `dp_mesh` (both sliced from
    one root mesh), equal to `build()` run unsharded with the same seed, without any rank ever
    holding the whole model: meta skeleton -> apply_tensor_parallel -> activation checkpointing
    -> apply_fsdp -> each rank's shards cut parameter by parameter from a ZeRO-3 build over
    `group` (my group's S ranks). Collective over `group`.

    `weights`: where the values come from instead, an object with `skeleton(build)` (the model
    to shard, parameters on the meta device) and `fill(model, device)` (each rank's shards), e.g.
    `pretrained.Pretrained(folder)`: each rank reads only its own pieces of the file (no ZeRO-3
    build, no collective)."""
    from codistill_ds.backends.activation_checkpointing import (
        apply_activation_checkpointing,
    )
    from codistill_ds.backends.materialize import build_zero3

    device = device or torch.device("cpu")
    if weights is not None:
        skeleton = weights.skeleton(build)
    else:
        with torch.device("meta"):
            skeleton = build()
    if tp_mesh is not None:  # None: no tensor parallelism (HSDP or activation checkpointing only)
        apply_tensor_parallel(skeleton, tp_mesh)
    apply_activation_checkpointing(skeleton, activation_checkpointing)
    apply_fsdp(skeleton, dp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
               reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    if cpu_offload:
        device = torch.device("cpu")
    if weights is not None:
        return weights.fill(skeleton, device)
    values = build_zero3(build, group)
    model = materialize_from_zero3(skeleton, values, device)
    del values
    return model


