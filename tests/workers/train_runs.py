"""Rank program: several trainings of the CLI, one after the other, in one launch.

Each run is what `codistill-ds train --config CONFIG --set ...` runs on a rank (`load_config`,
then `codistill_ds.run.job.run`), in its own run dir with its own process groups, replica and
exchange; the default process group and the imports are made once: a rank start costs ~10 s of
CPU, a tiny run a fraction of that. The teardown of `codistill-ds train` (`shutdown`: every
group's queued collectives finished, then destroyed) runs once, after the last run.
Args: CONFIG then the runs' overrides, runs separated by `--` (each run names its `run_dir=`)."""

from __future__ import annotations

import sys

from codistill_ds.config import load_config
from codistill_ds.distributed import comm
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.run import job


def split_runs(args: list[str]) -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for a in args:
        if a == "--":
            runs.append([])
        else:
            runs[-1].append(a)
    return [r for r in runs if r]


def main() -> None:
    config, runs = sys.argv[1], split_runs(sys.argv[2:])
    for overrides in runs:
        job.run(load_config(config, overrides))
        comm.barrier()  # the next run's groups are made once every rank has left this one
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
