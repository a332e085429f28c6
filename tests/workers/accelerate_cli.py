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
from codistill_ds.run.loop import LoopHooks


def recording(out: Path):
    """`build_job` plus a loop hook that records, at the end of the run, this rank's partition
    sizes and a checksum of its group's full weights."""
    build = train.build_job

    class Record(LoopHooks):
        def __init__(self, job, parts, gathered, full) -> None:
            self.job, self.parts, self.gathered, self.full = job, parts, gathered, full

        def on_run_end(self, loop, state) -> None:
            with self.gathered():
                checksum = float(sum(t.detach().double().sum() for t in self.full()))
            t = self.job.topology
            result = {"rank": t.rank, "group": t.group_id, "group_rank": t.position, "S": t.group_size,
                      "parts": self.parts, "checksum": checksum}
            (out / f"rank{t.rank}.json").write_text(json.dumps(result))

    def build_job(cfg, hooks=()):
        job = build(cfg, hooks)
        job.loop.hooks.append(Record(job, *view(job, cfg.backend.name)))
        return job

    return build_job


def main() -> None:
    out = Path(sys.argv[1])
    train.build_job = recording(out)
    sys.exit(cli.main(["train", *sys.argv[2:]]))


if __name__ == "__main__":
    main()
