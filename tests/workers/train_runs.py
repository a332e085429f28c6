"""Rank program: several trainings of the CLI, one after the other, in one launch.

Each run is what `codistill-ds train --config CONFIG --set ...` runs on a rank (`load_config`,
then `codistill_ds.run.job.run`), in its own run dir with its own process groups, replica and
exchange; the default process group and the imports are made once: a rank start costs ~10 s of
CPU, a tiny run a fraction of that. The teardown of `codistill-ds train` (`shutdown`: every
group's queued collectives finished, then destroyed) runs once, after the last run.
Args: OUT CONFIG [overrides...] @NAME [overrides...]... (tests/workers/runs.py); each run's
run_dir is OUT/NAME."""

from __future__ import annotations

import sys
from pathlib import Path

from codistill_ds.config import load_config
from codistill_ds.distributed import comm
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.run import job
from runs import split_runs


def main() -> None:
    out, config = Path(sys.argv[1]), sys.argv[2]
    for run_dir, overrides in split_runs(out, sys.argv[3:]):
        job.run(load_config(config, [f"run_dir={run_dir}", *overrides]))
        comm.barrier()  # the next run's groups are made once every rank has left this one
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
