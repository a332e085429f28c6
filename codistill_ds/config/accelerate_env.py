"""`accelerate launch` support: Accelerate's YAML picks the sharding engine, the project config the rest.

    accelerate launch --config_file launch/accelerate/zero3.yaml -m codistill_ds.cli train \\
        --config examples/tiny_cpu.yaml

`accelerate launch` starts the ranks (torchrun underneath: RANK, WORLD_SIZE, MASTER_ADDR, ...)
and exports its YAML as environment variables. Accelerate has no field for a process group that
is smaller than the world (docs/design.md, "Platform facts"), so the library does not build an
`Accelerator` at all: `train.prepare` calls `apply_launch_env` before validating the config, and
the run then shards inside each codistillation group exactly as under torchrun or deepspeed.

What is read (accelerate 1.15, `accelerate/utils/launch.py`), and what it sets:

| Accelerate exports                                  | codistill config                           |
|-----------------------------------------------------|--------------------------------------------|
| ACCELERATE_USE_DEEPSPEED=true                       | backend.name = deepspeed                   |
|   ACCELERATE_DEEPSPEED_CONFIG_FILE (deepspeed_config_file) | backend.ds_config = that file        |
|   else ACCELERATE_DEEPSPEED_ZERO_STAGE (zero_stage) | backend.ds_config = ds_configs/zero{N}.json |
|     with ACCELERATE_DEEPSPEED_OFFLOAD_*_DEVICE=cpu  |   stage 3: ds_configs/zero3_offload.json   |
| ACCELERATE_USE_FSDP=true                            | backend.name = fsdp (needs FSDP_VERSION=2) |
|   FSDP_RESHARD_AFTER_FORWARD                        | backend.fsdp_reshard_after_forward         |
|   FSDP_OFFLOAD_PARAMS                               | backend.fsdp_cpu_offload                   |
| ACCELERATE_MIXED_PRECISION=bf16 | no                | backend.precision = bf16 | (unchanged)     |

The launcher's engine choice wins over the config file's `backend.*` (the YAML is what the user
launched with); batch sizes, gradient accumulation, clipping and everything codistillation stay
in the project config, which is also where DeepSpeed gets them (`deepspeed_backend.py`).
Accelerate's own `gradient_accumulation_steps`/`gradient_clipping` keys are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from codistill_ds.config import Config, ConfigError


def _flag(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "false").strip().lower() in ("1", "true", "yes")


def _deepspeed(cfg: Config, env: Mapping[str, str]) -> list[str]:
    cfg.backend.name = "deepspeed"
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        cfg.backend.ds_config = path
        return ["backend.name=deepspeed", f"backend.ds_config={path}"]
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None:
        return ["backend.name=deepspeed"]
    if stage not in ("1", "2", "3"):
        raise ConfigError("backend.ds_config", f"accelerate's zero_stage {stage} has no shipped "
                          "ds_configs/zero{stage}.json; use zero_stage 1, 2 or 3 or deepspeed_config_file")
    offload = any(env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none").lower() == "cpu"
                  for what in ("OPTIMIZER", "PARAM"))
    cfg.backend.ds_config = "ds_configs/zero3_offload.json" if stage == "3" and offload else f"ds_configs/zero{stage}.json"
    return ["backend.name=deepspeed", f"backend.ds_config={cfg.backend.ds_config}"]


def _fsdp(cfg: Config, env: Mapping[str, str]) -> list[str]:
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError("backend.name", f"accelerate's fsdp_version is {version}; codistillation shards "
                          "with FSDP2 on a ('codistill', 'shard') mesh: set fsdp_version: 2")
    cfg.backend.name = "fsdp"
    applied = ["backend.name=fsdp"]
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
    if reshard is not None:
        # FSDP1-style strategy names are accepted too: only SHARD_GRAD_OP keeps params after forward.
        cfg.backend.fsdp_reshard_after_forward = reshard.strip().lower() not in ("false", "0", "shard_grad_op", "2")
        applied.append(f"backend.fsdp_reshard_after_forward={cfg.backend.fsdp_reshard_after_forward}")
    if "FSDP_OFFLOAD_PARAMS" in env:
        cfg.backend.fsdp_cpu_offload = _flag(env, "FSDP_OFFLOAD_PARAMS")
        applied.append(f"backend.fsdp_cpu_offload={cfg.backend.fsdp_cpu_offload}")
    return applied


def _precision(cfg: Config, env: Mapping[str, str]) -> list[str]:
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if mp in ("no", ""):
        return []
    if mp != "bf16":
        raise ConfigError("backend.precision", f"accelerate's mixed_precision {mp!r} is not supported; "
                          "use 'bf16' or 'no'")
    cfg.backend.precision = "bf16"
    return ["backend.precision=bf16"]


def apply_launch_env(cfg: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """Map `accelerate launch` settings onto `cfg.backend` in place; returns what was set.

    A no-op outside `accelerate launch` (none of its variables are set), so `train` calls it
    unconditionally. Pure environment reading: Accelerate itself is never imported."""
    env = os.environ if env is None else env
    use_ds, use_fsdp = _flag(env, "ACCELERATE_USE_DEEPSPEED"), _flag(env, "ACCELERATE_USE_FSDP")
    if use_ds and use_fsdp:
        raise ConfigError("backend.name", "accelerate exported both DeepSpeed and FSDP settings")
    applied = _deepspeed(cfg, env) if use_ds else _fsdp(cfg, env) if use_fsdp else []
    if applied:
        applied += _precision(cfg, env)
    return applied
