"""Tensor parallelism and HSDP inside a group run in the CLI only: the Trainer and the own
Accelerate loop refuse them with one line naming what to use (`parallel.tp`, `parallel.replicate`).

Why they cannot carry a group's mesh (read from Accelerate 1.15 and Transformers 5.23):

- `ParallelismConfig.build_device_mesh` calls `init_device_mesh` over the whole world, and
  `_validate_accelerator` (run in `Accelerator.__init__`) requires `total_size ==
  num_processes`: a config of one group's S ranks is refused by Accelerate itself, and a
  world-sized one lays its `dp_replicate`/`dp_shard` axes across the codistillation groups, so
  one group would all-reduce with, or shard its replica over, another (synchronous training, or
  one model). There is no field for a sub-group: a pre-set `device_mesh` is still sized against
  the world, and FSDP2 and TP are then applied on `accelerator.torch_device_mesh` (its "tp" and
  "dp_shard_cp" dimensions).
- The Trainer turns a model loaded with `DistributedConfig(tp_size=...)` (`from_pretrained(...,
  tp_plan=...)`) into `ParallelismConfig(tp_size, dp_shard_size)`, with the same check, and
  Transformers builds that model's mesh over the whole world too (`distributed/utils.py`).
- DeepSpeed AutoTP (`tensor_parallel.autotp_size`) builds its TP and data-parallel groups over
  the whole world whatever `mpu` it is given (docs/design.md: group 1 trained group 0's weights);
  the CLI installs the group's own groups first (`backends/autotp.py`), Accelerate cannot.
- `fsdp: hybrid_shard` asks FSDP for replicas across the world.

Context and sequence parallelism are refused for the same reason (world-wide mesh axes).
"""

from __future__ import annotations

import json
from typing import Any

USE_CLI = ("tensor parallelism and HSDP inside a codistillation group run in the CLI: `codistill-ds train` with "
           "parallel.tp (FSDP2 + DTensor TP, or DeepSpeed AutoTP with ZeRO-1/2) and parallel.replicate (HSDP)")


def _sizes(config: Any, names: tuple[str, ...]) -> dict[str, int]:
    return {n: int(getattr(config, n, None) or 1) for n in names}


def requested_model_parallelism(*, parallelism_config: Any = None, ds_config: Any = None, model: Any = None,
                                fsdp: Any = None) -> list[str]:
    """What in these settings asks for model parallelism or replicas that would span the
    codistillation groups (empty: nothing)."""
    found = []
    if parallelism_config is not None:
        sizes = _sizes(parallelism_config, ("tp_size", "cp_size", "sp_size", "dp_replicate_size", "dp_shard_size"))
        found += [f"ParallelismConfig {n}={v}" for n, v in sizes.items() if v > 1]
    ds = _ds_dict(ds_config)
    autotp = int(((ds or {}).get("tensor_parallel") or {}).get("autotp_size") or 1)
    if autotp > 1:
        found.append(f"DeepSpeed tensor_parallel.autotp_size={autotp}")
    if model is not None:
        dist_cfg = getattr(getattr(model, "config", None), "distributed_config", None)
        tp = max(int(getattr(model, "_tp_size", None) or 1), int(getattr(dist_cfg, "tp_size", None) or 1))
        if tp > 1:
            found.append(f"a model loaded with tensor parallelism (tp_size={tp})")
        if dist_cfg is not None:
            found += [f"a model loaded with DistributedConfig {n}={v}" for n, v in
                      _sizes(dist_cfg, ("fsdp_size", "dp_replicate_size")).items() if v > 1]
    options = [str(getattr(o, "value", o)) for o in (fsdp or [])] if not isinstance(fsdp, str) else fsdp.split()
    found += [f"fsdp {o}" for o in options if o.startswith("hybrid_shard")]
    return found


def _ds_dict(ds_config: Any) -> dict | None:
    """A DeepSpeed config given as a dict, a JSON path or an object holding `.config`."""
    if ds_config is None or isinstance(ds_config, dict):
        return ds_config
    if isinstance(ds_config, str):
        try:
            with open(ds_config) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
    return getattr(ds_config, "config", None)


def refuse_model_parallelism(who: str, **settings: Any) -> None:
    """Raise `ValueError` (one line) when `settings` (see `requested_model_parallelism`) ask for
    model parallelism the `who` path cannot keep inside a group."""
    found = requested_model_parallelism(**settings)
    if found:
        raise ValueError(f"{who} cannot keep {', '.join(found)} inside one codistillation group (Accelerate "
                         f"builds that mesh over the whole world, across the groups); {USE_CLI}")
