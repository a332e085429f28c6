"""Rank program: the real CLI, `codistill-ds train ARGS...`, interrupted at a known point: rank 0
SIGKILLs itself when the save of checkpoint step_STEP begins, and the launcher takes the other
ranks down (torchrun's behaviour when a rank dies). The checkpoint before STEP is then the
newest complete one, and the records written since belong to an abandoned attempt. Args: STEP
ARGS..."""

from __future__ import annotations

import os
import signal
import sys

from codistill_ds import cli
from codistill_ds.distributed.env import env_rank
from codistill_ds.run import job as train


def main() -> None:
    at = int(sys.argv[1])

    class KilledAtSave(train.Saver):
        def save(self, step: int) -> str:
            if step == at and env_rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().save(step)

    train.Saver = KilledAtSave
    sys.exit(cli.main(["train", *sys.argv[2:]]))


if __name__ == "__main__":
    main()
