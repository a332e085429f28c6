"""One rank of the torchft-overhead part (`ftoverhead.py`): `codistill-ds train`'s own `run`,
held at a gate between blocks of steps so that two arms take turns on the same cores.

    python -m benchmarks.comm.gate CONFIG.yaml GATE.json ARM key=value...

Why a gate and not two launches one after the other: on a shared 2-core machine the load
drifts by tens of percent within minutes, so step times of two launches run minutes apart
compare the load, not the transports. Here both arms are launched at once and wait at the
start of a step until the orchestrator lets their arm run up to some step; the arms take turns
every few steps, so every block of one arm has a block of the other within seconds of it.
Waiting happens before `train_step` starts its clock (`LoopHooks.on_step_start`), so no record's
`step_ms` contains it. Nothing of the library is patched.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from codistill_ds.run.loop import LoopHooks

POLL_S = 0.002
"""How often a held rank looks at the gate file (a stat; the file is read when it changed)."""


class Gate(LoopHooks):
    """`LoopHooks` that hold step s until the gate file allows this arm at least s + 1 steps."""

    def __init__(self, path: Path, arm: str) -> None:
        self.path, self.arm = path, arm
        self._stamp, self._allowed = None, 0

    def _read(self) -> int:
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return self._allowed
        if stamp != self._stamp:
            try:
                self._allowed = int(json.loads(self.path.read_text())[self.arm])
                self._stamp = stamp
            except (ValueError, KeyError):  # caught mid-write: read again at the next poll
                pass
        return self._allowed

    def on_step_start(self, loop, step: int) -> None:
        while self._read() <= step:
            time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    config, gate, arm, *overrides = argv
    from codistill_ds.config import load_config
    from codistill_ds.distributed import env as rankinfo
    from codistill_ds.run.job import run

    run(load_config(config, overrides), hooks=[Gate(Path(gate), arm)])
    rankinfo.shutdown()
    rankinfo.exit_process(0)  # as `codistill-ds train`: skip interpreter finalization
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
