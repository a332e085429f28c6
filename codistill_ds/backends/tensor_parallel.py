"""Tensor parallelism (DTensor) + FSDP2/HSDP inside one codistillation group, torchtitan style.

A group of S ranks is replicate x dp_shard x tp = R x D x T, one DeviceMesh with dims
("codistill", "replicate", "dp_shard", "tp") = (K, R, D, T), group-major, TP innermost and
contiguous (DESIGN.md, "Model parallelism inside a group"). Every function here takes plain
arguments (sub-meshes, the model, dtypes) and reads no config or environment, so the axes object
and the backend can compose them:

    model = apply_tensor_parallel(skeleton, mesh["tp"])            # q/k/v/gate/up col, o/down row
    model = apply_activation_checkpointing(model, "full")           # activation_checkpointing.py
    model = apply_fsdp(model, data_parallel_mesh(mesh))             # over (replicate, dp_shard)
    materialize_from_zero3(model, build_zero3(build, group), dev)   # each rank: its shards only
    ...
    with loss_parallel_context(logits): loss = cross_entropy(logits, labels); loss.backward()
    clip_grad_norm_(model.parameters(), max_norm)                   # works across meshes

What this module relies on, measured with torch 2.13 on CPU/gloo (DESIGN.md):
- TP and FSDP must share ONE root mesh: two separately built meshes fail at `fully_shard`
  ("Cannot concatenate DeviceMeshes derived from different device meshs");
- `torch.nn.utils.clip_grad_norm_` fails on a model whose parameters live on different meshes
  (TP+FSDP matrices on (dp, tp), norms on (dp) only): "All operands in aten.stack.default must
  have the same mesh"; `clip_grad_norm_` below groups the gradients by mesh and placements;
- the lm_head is column-parallel with `use_local_output=False`, so logits are a vocab-sharded
  DTensor (Shard(-1)) that `loss_parallel` reduces without gathering the vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
"""What torch's `checkpoint_wrapper` inserts into parameter names (state dicts strip it)."""


class TensorParallelUnsupported(ValueError):
    """A model this module cannot split with torch's column/row-wise styles."""


# ---- validation ---------------------------------------------------------------------------------

DIVISIBLE_FIELDS = {
    "num_attention_heads": "model.num_heads",
    "num_key_value_heads": "model.num_kv_heads",
    "intermediate_size": "model.intermediate_size",
    "vocab_size": "data.tokenizer",
}
"""Hugging Face config attribute -> the codistill config field a user changes to fix it."""


def check_tp_divisible(hf_config: Any, tp: int, fields: Mapping[str, str] | None = None,
                       tp_field: str = "parallel.tp") -> None:
    """Raise `codistill_ds.config.ConfigError(field, reason)` unless T splits the model evenly.

    Column-parallel q/k/v give each TP rank num_heads/T query heads and num_kv_heads/T KV heads
    (grouped-query attention needs both whole), gate/up give intermediate_size/T columns, and
    the embedding and lm_head vocabulary/T rows (the exchange works on equal vocabulary slices).
    `fields` maps each HF attribute to the config field named in the error (DIVISIBLE_FIELDS by
    default). Pure: run it on every rank at start, before any collective."""
    from ..config import ConfigError

    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(tp_field, f"must be a positive integer, got {tp!r}")
    names = dict(DIVISIBLE_FIELDS, **(fields or {}))
    heads = getattr(hf_config, "num_attention_heads", None)
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    values = {"num_attention_heads": heads, "num_key_value_heads": kv,
              "intermediate_size": getattr(hf_config, "intermediate_size", None),
              "vocab_size": getattr(hf_config, "vocab_size", None)}
    why = {"num_attention_heads": "each TP rank computes num_heads / T query heads",
           "num_key_value_heads": "each TP rank keeps num_kv_heads / T key/value heads",
           "intermediate_size": "gate/up/down split the MLP width over the TP ranks",
           "vocab_size": "the embedding, lm_head and logits split the vocabulary into T equal "
                         "slices (pad the vocabulary to a multiple of T)"}
    for attr, value in values.items():
        if value is None:
            raise ConfigError(names[attr], f"the model config has no '{attr}'; tensor parallelism "
                                           f"({tp_field} = {tp}) needs it")
        if value % tp:
            raise ConfigError(names[attr], f"{attr} = {value} is not divisible by {tp_field} = {tp} "
                                           f"({why[attr]})")


# ---- tensor parallelism ---------------------------------------------------------------------------

BLOCK_PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}  # fmt: skip
"""Per decoder layer (Llama-family names). Column-wise: output features split, input replicated,
output a local Shard(-1) tensor (local heads / local MLP columns); row-wise: input features split,
output all-reduced to a replicated plain tensor."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (`model.model.layers` for Llama-family causal LMs)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TensorParallelUnsupported(f"{type(model).__name__}: no decoder layer list at "
                                        f"'{getattr(model, 'base_model_prefix', 'model')}.layers'")
    return layers


def _refuse_unsupported(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    if model_type in ("gpt2", "gpt_bigcode", "openai-gpt") or any(isinstance(m, Conv1D) for m in model.modules()):
        raise TensorParallelUnsupported(
            f"tensor parallelism does not support {model_type}: its attention packs q, k and v into "
            "one fused Conv1D (c_attn) that column-wise sharding would cut across q|k|v. Use a "
            "Llama-family model (model.arch: llama) for parallel.tp > 1, or keep parallel.tp: 1 and "
            "shard GPT-2 with FSDP2 or ZeRO-3")
    if getattr(config, "tie_word_embeddings", False):
        raise TensorParallelUnsupported(
            f"{model_type} ties lm_head to the input embedding (tie_word_embeddings=True); the "
            "vocabulary-parallel embedding and lm_head are split separately here. Untie them "
            "(tie_word_embeddings: false) or use parallel.tp: 1")
    missing = []
    for i, layer in enumerate(decoder_layers(model)):
        for path in BLOCK_PLAN:
            try:
                sub = layer.get_submodule(path)
            except AttributeError:
                sub = None
            if not isinstance(sub, nn.Linear):
                missing.append(f"layers.{i}.{path}")
    for name in ("lm_head",):
        if not isinstance(getattr(model, name, None), nn.Linear):
            missing.append(name)
    if not isinstance(model.get_input_embeddings(), nn.Embedding):
        missing.append("embed_tokens")
    if missing:
        raise TensorParallelUnsupported(
            f"{type(model).__name__} is not a Llama-family layout (nn.Linear q/k/v/o_proj and "
            f"gate/up/down_proj per layer, an nn.Embedding and an nn.Linear lm_head): missing "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard a Hugging Face Llama-family causal LM over `tp_mesh` (1-D, the "tp" dim) in place.

    q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel, the embedding RowwiseParallel
    (vocabulary rows split, output all-reduced), lm_head ColwiseParallel with
    `use_local_output=False`: logits come out as a DTensor sharded on the vocabulary, Shard(-1).
    Attention runs on local heads: HF's attention views q/k/v as (..., -1, head_dim) and keeps
    num_key_value_groups = heads / kv_heads, both unchanged by an even split (check_tp_divisible).
    Norms stay replicated plain parameters (FSDP shards them over the data-parallel mesh only).
    Apply before activation checkpointing and `fully_shard`, on a meta skeleton or a real model.
    A one-rank mesh leaves the model unchanged (logits are plain tensors then)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    _refuse_unsupported(model)
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D (the 'tp' dim), got {tp_mesh.ndim} dims {tp_mesh.mesh_dim_names}")
    T = tp_mesh.size()
    config = getattr(model, "config", None)
    if config is not None:
        check_tp_divisible(config, T)
    if T == 1:
        return model
    style = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, {path: style[kind]() for path, kind in BLOCK_PLAN.items()})
    embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    parallelize_module(model, tp_mesh, {
        embed_name: RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False),
    })
    return model


# ---- FSDP2 / HSDP --------------------------------------------------------------------------------

def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over, sliced from the same root mesh as "tp" (it must be):
    mesh["replicate", "dp_shard"] (HSDP: replicate across R, shard across D) when R > 1, else
    the 1-D mesh["dp_shard"] (plain FSDP, no all-reduce over one-rank replicas)."""
    if mesh["replicate"].size() > 1:
        return mesh["replicate", "dp_shard"]
    return mesh["dp_shard"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers as they now sit in the layer list (checkpoint-wrapped or not)."""
    return list(decoder_layers(model))


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               cpu_offload: bool = False) -> nn.Module:
    """`fully_shard` each decoder layer, then the root, over `dp_mesh` (1-D: FSDP; 2-D
    (replicate, dp_shard): HSDP). TP-sharded parameters become 2-D/3-D DTensors on the
    concatenation of dp_mesh and their tp mesh, which is why both must come from one root mesh.

    `param_dtype` is the compute dtype (e.g. torch.bfloat16: FSDP2 MixedPrecisionPolicy; None
    keeps fp32); gradients are reduced in `reduce_dtype`; `cpu_offload` keeps sharded parameters,
    gradients and optimizer states in host memory."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
    )

    if dp_mesh.ndim not in (1, 2):
        raise ValueError(f"dp_mesh must be 1-D (dp_shard) or 2-D (replicate, dp_shard), got {dp_mesh.mesh_dim_names}")
    kwargs: dict[str, Any] = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        # Pinned host memory needs an accelerator: on a CPU-only machine FSDP2 fails at
        # load_state_dict with "Cannot access accelerator device when none is available".
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ---- gradient clipping across meshes -------------------------------------------------------------

def _norm_key(grad: torch.Tensor) -> tuple:
    from torch.distributed.tensor import DTensor

    if isinstance(grad, DTensor):
        return (grad.device_mesh, tuple(grad.placements))
    return (None, ())


def grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """The total norm of the gradients of `parameters`, as an unsharded model would compute it.

    Gradients are grouped by (mesh, placements). In each group the local shards' p-th powers are
    summed (max for inf) and reduced over exactly the mesh dims the group is *sharded* on
    (Shard, FSDP's _StridedShard), never over dims it is replicated on: a norm weight replicated on the
    T TP ranks counts once, not T times. The reduction is DTensor's own (a Partial -> Replicate
    redistribute), so no collective is called here. Collective over every mesh involved."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(_norm_key(g), []).append(g)
    reduce_op = "max" if math.isinf(norm_type) else "sum"
    parts = []
    for (mesh, placements), members in groups.items():
        local = [g.to_local() if isinstance(g, DTensor) else g for g in members]
        norms = torch.stack([torch.linalg.vector_norm(t.detach().float(), norm_type) for t in local])
        if math.isinf(norm_type):
            value = norms.max()
        else:
            value = norms.pow(norm_type).sum()
        if mesh is not None:
            if any(p.is_partial() for p in placements):
                raise ValueError(f"gradient with Partial placements {placements}: reduce it before clipping")
            # "Not replicated" rather than is_shard(): FSDP's _StridedShard (dp dim of a
            # TP-sharded matrix) is not a Shard subclass in torch 2.13 and answers
            # is_shard() == False; testing is_shard() left it unreduced (measured: the norm of
            # mesh (1,1,2,2) came out 0.761 instead of 1.035 and differed between data ranks).
            reduced = [Replicate() if p.is_replicate() else Partial(reduce_op) for p in placements]
            value = DTensor.from_local(value, mesh, reduced, run_check=False).full_tensor()
        parts.append(value)
    stacked = torch.stack(parts)
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.sum().pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for parameters on several meshes (TP + FSDP): the same
    total norm as the unsharded model (`grad_norm`), the same coefficient
    max_norm / (norm + 1e-6) clamped to 1, applied to every local shard. Returns the total norm
    (a plain tensor, equal on every rank of the group)."""
    from torch.distributed.tensor import DTensor

    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    total = grad_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite: {total.item()}")
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        local.mul_(coef.to(local.device, local.dtype))
    return total


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
    before the next parameter. The shards enter through `load_state_dict(assign=True)`, FSDP2's
    route for replacing sharded parameters. At most one full parameter is alive at a time.
    `buffers` (e.g. rotary tables, replicated) are set as given."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    skeleton = model.state_dict(keep_vars=True)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for key, p in skeleton.items():
        if id(p) not in names:
            continue  # buffers
        full = full_value(clean_name(key)).detach()
        if isinstance(p, DTensor):
            piece = distribute_tensor(full.to(device=device, dtype=p.dtype), p.device_mesh, p.placements,
                                      src_data_rank=None)
            local = piece.to_local().clone()
            del piece
            state[key] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride())
        else:
            state[key] = full.to(device=device, dtype=p.dtype).clone()
        del full
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in (buffers or {}).items():
        owner = _find_owner(model, name)
        owner[0]._buffers[owner[1]] = buf.to(device)
    left = [n for n, p in model.named_parameters() if _local(p).is_meta]
    if left:
        from ..materialize import UninitializedModelError

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


def build_parallel_replica(build: Callable[[], nn.Module], *, tp_mesh: DeviceMesh, dp_mesh: DeviceMesh,
                           group: Any, activation_checkpointing: str = "none",
                           param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
                           reshard_after_forward: bool = True, cpu_offload: bool = False,
                           device: torch.device | None = None) -> nn.Module:
    """A replica TP-sharded over `tp_mesh` and FSDP/HSDP-sharded over `dp_mesh` (both sliced from
    one root mesh), equal to `build()` run unsharded with the same seed, without any rank ever
    holding the whole model: meta skeleton -> apply_tensor_parallel -> activation checkpointing
    -> apply_fsdp -> each rank's shards cut parameter by parameter from a ZeRO-3 build over
    `group` (my group's S ranks). Collective over `group`."""
    from ..materialize import build_zero3
    from .activation_checkpointing import apply_activation_checkpointing

    device = device or torch.device("cpu")
    with torch.device("meta"):
        skeleton = build()
    apply_tensor_parallel(skeleton, tp_mesh)
    apply_activation_checkpointing(skeleton, activation_checkpointing)
    apply_fsdp(skeleton, dp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
               reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    values = build_zero3(build, group)
    model = materialize_from_zero3(skeleton, values, torch.device("cpu") if cpu_offload else device)
    del values
    return model


# ---- the loss on vocabulary-sharded logits --------------------------------------------------------

def is_vocab_sharded(logits: torch.Tensor) -> bool:
    """True for the DTensor logits of a TP lm_head (Shard on the last dim)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(logits, DTensor):
        return False
    shard_dims = [p.dim % logits.ndim for p in logits.placements if p.is_shard()]
    return shard_dims == [logits.ndim - 1]


def loss_parallel_context(logits: torch.Tensor):
    """torch's `loss_parallel()` when `logits` are vocab-sharded, else a no-op context. The
    forward of `cross_entropy` AND the backward must run inside it (torch's rule: the backward
    of log_softmax/nll_loss on Shard(-1) logits is custom-handled only there)."""
    if is_vocab_sharded(logits):
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return nullcontext()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy of logits [..., V] against labels [...], as a plain tensor equal
    on every TP rank. On vocab-sharded DTensor logits call it inside `loss_parallel_context`:
    the vocabulary is never gathered (max/sum-exp all-reduces over tp)."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    flat = logits.flatten(0, -2)
    loss = F.cross_entropy(flat, labels.reshape(-1).to(flat.device), ignore_index=ignore_index)
    if isinstance(loss, DTensor):
        if any(not p.is_replicate() for p in loss.placements):
            raise RuntimeError("cross_entropy on vocab-sharded logits must run inside loss_parallel_context: "
                               f"got a loss with placements {loss.placements}")
        loss = loss.to_local()
    return loss


def local_vocab_slice(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's logits slice [N, V/T], the global vocabulary id of its column 0).

    For the exchange on vocabulary slices: column j of the slice is vocabulary id offset + j.
    Differentiable: a loss on the slice sends its gradient back into the sharded lm_head. Plain
    (T = 1) logits give ([N, V], 0)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(logits, DTensor):
        return logits.reshape(-1, logits.shape[-1]), 0
    if not is_vocab_sharded(logits):
        raise ValueError(f"logits are not sharded on the vocabulary only: placements {logits.placements}")
    _, offsets = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    local = logits.to_local()
    return local.reshape(-1, local.shape[-1]), int(offsets[-1])


# ---- checkpoints: DCP over the group ---------------------------------------------------------------

def save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str, process_group: Any) -> None:
    """Model and optimizer state (TP + FSDP DTensor shards, AdamW moments and step counts) into
    the directory `path` with torch.distributed.checkpoint, over my group's `process_group`
    only: each rank writes its own pieces. Collective over the group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, checkpoint_id=path, process_group=process_group)


def load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str, process_group: Any) -> None:
    """Restore what `save_dcp` wrote into a model built the same way (any seed), in place.
    Collective over the group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"no DCP checkpoint at {os.path.abspath(path)}")
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path, process_group=process_group)
        set_model_state_dict(model, state["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path, process_group=process_group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ---- export: a plain save_pretrained folder ---------------------------------------------------------

class _ShardWriter:
    """safetensors files of at most `max_bytes` each plus the index `from_pretrained` reads;
    holds at most one file's worth of tensors."""

    def __init__(self, out_dir: str, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, os.path.join(self.out_dir, f"part-{len(self.files):05d}.safetensors"),
                  metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.files)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(os.path.join(self.out_dir, f"part-{i:05d}.safetensors"), os.path.join(self.out_dir, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for i, keys in enumerate(self.files) for k in keys}}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names


def _save_config(hf_config: Any, out_dir: str, dtype: torch.dtype | None) -> None:
    """config.json, recording the dtype of the saved tensors (what from_pretrained's
    dtype="auto" loads them as)."""
    import copy

    hf_config = copy.deepcopy(hf_config)
    if dtype is not None:
        hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)


def export_pretrained(model: nn.Module, out_dir: str, *, writer: bool, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = 2 * 1024**3) -> list[str] | None:
    """Consolidate a TP/FSDP-sharded replica into a plain `save_pretrained` folder (config.json +
    safetensors of full tensors) that `AutoModelForCausalLM.from_pretrained` loads.

    Streams parameter by parameter: each is gathered (`full_tensor`, collective over its mesh,
    so every rank of the group must call this), and only the `writer` rank (one per group, e.g.
    its rank 0) keeps it until its safetensors file (at most `max_shard_bytes`) is written: no
    rank holds the whole model. Returns the file names on the writer, None elsewhere."""
    from torch.distributed.tensor import DTensor

    sink = _ShardWriter(out_dir, max_shard_bytes) if writer else None
    for name, p in model.named_parameters():
        full = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        if sink is not None:
            sink.add(clean_name(name), full.to(dtype or full.dtype).cpu().clone())
        del full
    if sink is None:
        return None
    _save_config(model.config, out_dir, dtype)
    return sink.close()


def export_from_dcp(checkpoint_dir: str, hf_config: Any, out_dir: str, *, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 2 * 1024**3, prefix: str = "model.") -> list[str]:
    """The same folder from a `save_dcp` checkpoint, offline (one process, no process group):
    each model tensor is read alone from the DCP files and written out, so memory stays at one
    safetensors file plus one tensor, whatever the TP/FSDP layout that saved it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(checkpoint_dir).read_metadata()
    sink = _ShardWriter(out_dir, max_shard_bytes)
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or not isinstance(meta, TensorStorageMetadata):
            continue
        name = key[len(prefix):]
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        dcp.load({prefix.rstrip("."): {name: tensor}}, checkpoint_id=checkpoint_dir, no_dist=True)
        sink.add(clean_name(name), tensor.to(dtype or tensor.dtype))
        del tensor
    _save_config(hf_config, out_dir, dtype)
    return sink.close()
