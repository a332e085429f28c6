"""Rank program: the library's ZeRO (through mpu) or FSDP2 (through the shard mesh) shards
each parameter (ZeRO-1/2: the optimizer state) over my group only. Args: OUT CONFIG [overrides...],
or several runs one after another on the same ranks (`@NAME [overrides...]`...,
tests/workers/runs.py: e.g. one per backend), each writing under OUT/NAME. Records partition
sizes, trains the configured steps, then records per-group weight checksums gathered inside the
group."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

from codistill_ds.config import load_config
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.run.job import build_job
from runs import split_runs


def deepspeed_view(engine):
    """ZeRO-3: each parameter's partition; ZeRO-1/2 (parameters whole on every rank): each
    parameter group's flat fp32 optimizer partition (`"group": True`)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() < 3:
        opt = engine.optimizer
        parts = [{"group": True, "full": sum(int(p.numel()) for p in group), "local": int(flat.numel()),
                  "shard_size": engine.dp_world_size}
                 for group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups)]
        return parts, nullcontext, lambda: params
    parts = [{"full": int(p.ds_numel), "local": int(p.ds_tensor.numel()), "rows": int(p.ds_shape[0]),
              "shard_size": engine.dp_world_size} for p in params]
    return parts, lambda: deepspeed.zero.GatheredParameters(params), lambda: params


def fsdp_view(module):
    params = list(module.parameters())
    parts = [{"full": int(p.numel()), "local": int(p.to_local().numel()), "rows": int(p.shape[0]),
              "shard_size": p.device_mesh.size(), "mesh": list(p.device_mesh.mesh_dim_names)}
             for p in params]
    return parts, nullcontext, lambda: [p.full_tensor() for p in params]


def view(job, backend: str):
    """(parts, gathered, full) of the CLI job's replica, for either backend."""
    return fsdp_view(job.backend.module) if backend == "fsdp" else deepspeed_view(job.backend.engine)


def run_one(out: Path, cfg) -> None:
    job = build_job(cfg)
    parts, gathered, full = view(job, cfg.backend.name)
    job.loop.run()
    with gathered():
        tensors = full()
        checksum = float(sum(t.detach().double().sum() for t in tensors))
    result = {"rank": job.topology.rank, "group": job.topology.group_id,
              "group_rank": job.topology.position, "S": job.topology.group_size,
              "parts": parts, "checksum": checksum}
    (out / f"rank{job.topology.rank}.json").write_text(json.dumps(result))


def main() -> None:
    out, config = Path(sys.argv[1]), sys.argv[2]
    for run_out, sets in split_runs(out, sys.argv[3:]):
        run_one(run_out, load_config(config, sets))
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()
