"""Rank program: weight-exchange teachers hold exactly what the peer sent at the last exchange.
Args: OUT CONFIG [overrides...]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from codistill_ds.config import load_config
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.exchange.weights import digest
from codistill_ds.run.job import build_job


def main() -> None:
    out, cfg = Path(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
    job = build_job(cfg)
    job.loop.run()
    w = job.loop.teachers
    result = {
        "rank": job.topology.rank, "group": job.topology.group_id, "group_rank": job.topology.position,
        "sent": w.last_sent_digest, "current": digest(job.backend.shards()),
        "teachers": {str(g): digest(t.shards()) for g, t in w.teachers.items()},
        "bytes": w.bytes_sent, "shard_numel": sum(s.numel() for s in job.backend.shards()),
    }
    (out / f"rank{job.topology.rank}.json").write_text(json.dumps(result))
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()
