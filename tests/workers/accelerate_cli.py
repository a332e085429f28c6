"""Rank program for `accelerate launch`: the real CLI, `codistill-ds train ARGS...`, plus a
record of the group-scoped engine it built. Args: OUT ARGS... Writes OUT/rank{r}.json with the
partition sizes of every parameter (ZeRO-1/2: of every optimizer partition) and, after training,
a checksum of the group's full weights (gathered inside the group)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from partition_check import view

from codistill_ds import cli
from codistill_ds.run import job as train


def recording(out: Path):
    build = train.build_job

    def build_job(cfg):
        job = build(cfg)
        parts, gathered, full = view(job, cfg.backend.name)
        run = job.loop.run

        def run_and_record(*args, **kwargs):
            state = run(*args, **kwargs)
            with gathered():
                checksum = float(sum(t.detach().double().sum() for t in full()))
            t = job.topology
            result = {"rank": t.rank, "group": t.group_id, "group_rank": t.position, "S": t.group_size,
                      "parts": parts, "checksum": checksum}
            (out / f"rank{t.rank}.json").write_text(json.dumps(result))
            return state

        job.loop.run = run_and_record
        return job

    return build_job


def main() -> None:
    out = Path(sys.argv[1])
    train.build_job = recording(out)
    sys.exit(cli.main(["train", *sys.argv[2:]]))


if __name__ == "__main__":
    main()
