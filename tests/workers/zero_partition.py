"""Rank program: ZeRO-3 through the library's mpu shards each parameter over my group only.
Args: OUT CONFIG [--set ...]. Trains the configured steps, then reports partition sizes and
per-group weight checksums gathered inside the group."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from codistill_ds.config import load_config
from codistill_ds.train import build_job


def main() -> None:
    out, cfg = Path(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
    job = build_job(cfg)
    import deepspeed

    engine = job.backend.engine
    params = list(engine.module.parameters())
    parts = [{"full": int(p.ds_numel), "local": int(p.ds_tensor.numel())} for p in params]
    job.loop.run()
    with deepspeed.zero.GatheredParameters(params):  # gathers over the group (ds_process_group)
        checksum = float(sum(p.detach().double().sum() for p in params))
        first = [float(x) for x in params[0].detach().flatten()[:4]]
    result = {"rank": job.topology.rank, "group": job.topology.group_id, "S": job.topology.group_size,
              "dp_world_size": engine.dp_world_size, "zero_stage": job.backend.zero_stage,
              "parts": parts, "checksum": checksum, "first": first}
    (out / f"rank{job.topology.rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
