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

import ckpt_run

from codistill_ds.distributed import comm


def run(out: str, config: str, overrides: list[str], last: bool) -> None:
    sys.argv = [sys.argv[0], out, config, f"run_dir={out}/run", *overrides]
    if last:
        ckpt_run.main()  # ends the process like `codistill-ds train`
        return
    # Not the last run: the process goes on, so ckpt_run's teardown becomes a barrier.
    shutdown, exit_process = ckpt_run.shutdown, ckpt_run.exit_process
    ckpt_run.shutdown, ckpt_run.exit_process = comm.barrier, lambda code: None
    try:
        ckpt_run.main()
    finally:
        ckpt_run.shutdown, ckpt_run.exit_process = shutdown, exit_process


def main() -> None:
    out_b, out_c, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        fault = os.environ.pop("FAULT", "")
        run(out_b, config, overrides, last=False)  # ckpt_run reads FAULT when a run starts
        ckpt_run.RECORD.update(sent={}, recv={}, start_step=None)
        os.environ["FAULT"] = fault
    run(out_c, config, overrides, last=True)


if __name__ == "__main__":
    main()
