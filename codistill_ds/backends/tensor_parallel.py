"""Tensor parallelism (DTensor) + FSDP2/HSDP inside one codistillation group, torchtitan style.

A group of S ranks is replicate x dp_shard x tp = R x D x T, one DeviceMesh with dims
("codistill", "replicate", "dp_shard", "tp") = (K, R, D, T), group-major, TP innermost and
contiguous (docs/design.md, "Model parallelism inside a group"). Every function here takes plain
arguments (sub-meshes, the model, dtypes) and reads no config or environment, so the axes object
and the backend can compose them:

    model = apply_tensor_parallel(skeleton, mesh["tp"])            # q/k/v/gate/up col, o/down row
    model = apply_activation_checkpointing(model, "full")           # activation_checkpointing.py
    model = apply_fsdp(model, data_parallel_mesh(mesh))             # over (replicate, dp_shard)
    materialize_from_zero3(model, build_zero3(build, group), dev)   # each rank: its shards only
    ...
    with loss_parallel_context(logits): loss = cross_entropy(logits, labels); loss.backward()
    clip_grad_norm_(model.parameters(), max_norm)                   # works across meshes

What this module relies on, measured with torch 2.13 on CPU/gloo (docs/design.md):
- TP and FSDP must share ONE root mesh: two separately built meshes fail at `fully_shard`
  ("Cannot concatenate DeviceMeshes derived from different device meshs");
- `torch.nn.utils.clip_grad_norm_` fails on a model whose parameters live on different meshes
  (TP+FSDP matrices on (dp, tp), norms on (dp) only): "All operands in aten.stack.default must
  have the same mesh"; `clip_grad_norm_` below groups the gradients by mesh and placements;
- the lm_head is column-parallel with `use_local_output=False`, so logits are a vocab-sharded
  DTensor (Shard(-1)) that `loss_parallel` reduces without gathering the vocabulary.
"""
from __future__ import annotations

from collections.abc import Mapping
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
    from codistill_ds.config import ConfigError

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


