"""Checkpoints of a TP + FSDP replica through `torch.distributed.checkpoint` over its group, and
the export to a plain `save_pretrained` folder (full tensors, safetensors shards)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from codistill_ds.backends.replica import clean_name

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
