"""`from_pretrained` under ZeRO-3 with codistillation groups: every group's leader loads.

Transformers 5.23 loads a ZeRO-3 model on *global* rank 0 only: it reads the checkpoint there
(`map_location="meta"` elsewhere), copies each module's tensors in under
`GatheredParameters(modifier_rank=0)` when `torch.distributed.get_rank() == 0`, and broadcasts
buffers from global rank 0 over the world. With codistillation groups the parameters are
partitioned over the group, so rank 0's values reach group 0 only and every other group keeps
whatever it had (docs/design.md, "GPU notes"). Inside `loading_in_group(topology)`:

- the checkpoint is read for real on every group leader (local rank 0 of each group);
- `_load_state_dict_into_zero3_model` is replaced by `load_into_zero3_in_group`, the same walk
  with the group leader in place of global rank 0 (`modifier_rank=0` is already the group's
  rank 0 for group-partitioned parameters) and buffers broadcast inside the group;
- Transformers is told ZeRO-3 is on even without a ZeRO-3 TrainingArguments, so that a model
  built partitioned (`materialize.group_init`) is always loaded this way.

Every group loads the same checkpoint from its own leader's disk: nothing crosses groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed.topology import Topology


def load_into_zero3_in_group(model: torch.nn.Module, state_dict: dict, load_config: Any,
                             topology: Topology) -> tuple[list[str], set[str]]:
    """Transformers' `_load_state_dict_into_zero3_model`, group-aware: (error messages,
    missing keys). Collective over my group (each module's parameters are gathered)."""
    import deepspeed

    metadata = getattr(state_dict, "_metadata", None)
    state_dicts = [dict(state_dict)]
    mapping = getattr(load_config, "weight_mapping", None)
    if mapping:
        from transformers.integrations.deepspeed import (
            _apply_weight_conversions_to_state_dict,
        )

        state_dicts = _apply_weight_conversions_to_state_dict(model, state_dicts[0], mapping)
        model._weight_conversions = mapping
    leader = topology.is_leader
    errors: list[str] = []
    own = model.state_dict()
    missing = set(own)
    prefix_model = getattr(model, "base_model_prefix", None)

    def load(module: torch.nn.Module, sd: dict, prefix: str = "") -> None:
        local_metadata = {} if metadata is None else dict(metadata.get(prefix[:-1], {}))
        local_metadata["assign_to_params_buffers"] = False
        named = dict(module.named_parameters(prefix=prefix[:-1], recurse=False))
        params = []
        for key, param in named.items():
            if key in sd:
                param._is_hf_initialized = True  # keep the missing-keys pass off it
                params.append(param)
                missing.discard(key)
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if leader:
                    module._load_from_state_dict(sd, prefix, local_metadata, True, [], [], errors)
        for key, buf in dict(module.named_buffers(prefix=prefix[:-1], recurse=False)).items():
            if key in sd and buf is not None:
                missing.discard(key)
                value = sd[key].to(buf.device) if leader else torch.empty(sd[key].shape, dtype=sd[key].dtype, device=buf.device)
                comm.broadcast(value, src=topology.dims.leader_of(topology.group_id), group=topology.group)
                with torch.no_grad():
                    buf.copy_(value)
                buf._is_hf_initialized = True
        for name, child in module._modules.items():
            if child is not None:
                load(child, sd, prefix + name + ".")

    for converted in state_dicts:
        sd = {(f"{prefix_model}.{k}" if own.get(f"{prefix_model}.{k}") is not None else k): v
              for k, v in converted.items()}
        load(model, sd)
    return errors, missing


@contextmanager
def loading_in_group(topology: Topology) -> Iterator[None]:
    """Within the block, `from_pretrained` of a ZeRO-3 model loads on every group's leader."""
    from transformers import modeling_utils

    saved = {name: getattr(modeling_utils, name)
             for name in ("load_state_dict", "_load_state_dict_into_zero3_model", "is_deepspeed_zero3_enabled")}
    read = saved["load_state_dict"]

    def load_state_dict(checkpoint_file, map_location="cpu", *args, **kwargs):
        if map_location == "meta" and topology.is_leader:
            map_location = "cpu"  # the group leader needs the values, not only the shapes
        return read(checkpoint_file, map_location, *args, **kwargs)

    def load_into(model, state_dict, load_config=None):
        return load_into_zero3_in_group(model, state_dict, load_config, topology)

    modeling_utils.load_state_dict = load_state_dict
    modeling_utils._load_state_dict_into_zero3_model = load_into
    modeling_utils.is_deepspeed_zero3_enabled = lambda: True
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(modeling_utils, name, value)
