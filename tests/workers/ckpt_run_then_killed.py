"""Rank program: tests/workers/ckpt_run.py twice in one launch, an uninterrupted run B and then
the same run C under injected faults, for a launch with `torchrun --max-restarts 1`.

The first attempt runs B with no fault (FAULT is set aside) and writes OUT_B/rank{r}.json, then
starts C in the same processes with FAULT back in place; C's fault kills a rank, torchrun
restarts every rank, and the restarted attempt (TORCHELASTIC_RESTART_COUNT 1) runs C alone: it
resumes from C's checkpoint and writes OUT_C/rank{r}.json. B thus costs no rank start of its own
(~10 s of CPU each). Both runs take the same CONFIG and overrides; each gets its own
`run_dir=OUT/run`. Args: OUT_B OUT_C CONFIG [overrides...]."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ckpt_run

from codistill_ds.config import load_config
from codistill_ds.distributed.env import exit_process, shutdown


def run(out: str, config: str, overrides: list[str]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    ckpt_run.run_one(Path(out), load_config(config, [f"run_dir={out}/run", *overrides]))


def main() -> None:
    out_b, out_c, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    ckpt_run.install(int(os.environ.get("RANK", "0")))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        fault = os.environ.pop("FAULT", "")
        run(out_b, config, overrides)  # ckpt_run reads FAULT as a run starts
        os.environ["FAULT"] = fault
    run(out_c, config, overrides)
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()
