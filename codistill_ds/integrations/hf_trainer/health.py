"""The CLI's failure handling (`health.py`) on the Trainer path: no silent hang, no poisoned peer.

What `codistill-ds train` does, and where the Trainer integration does the same:

| failure                         | CLI (`train.py`, `loop.py`)             | Trainer (`TrainerGuard`)                         |
|---------------------------------|-----------------------------------------|--------------------------------------------------|
| a peer's predictions are NaN    | engine skips and counts `skipped_peers` | the same engine (logged as `skipped_peers`)      |
| my group's loss turns NaN       | `check_finite_loss` after every step,   | `on_step_end` (after the optimizer step, before  |
|                                 | exit 4 with a note for the peers        | the next exchange): the same check, note, exit 4 |
| a peer rank or group is gone    | collective error or missed deadline:    | the same `Watchdog` around `train()`, with the   |
|                                 | one line naming it, exit 3              | heartbeats under `output_dir/health`             |

Evaluation and checkpoint saves run under `Watchdog.slow` (the Trainer's `ddp_timeout`), every
optimizer step under `peer_timeout_s`; the first step keeps the slow deadline (ZeRO-3 traces its
first forward with world-wide collectives). The watchdog stops when `train()` returns: what the
script does afterwards (save_model, evaluate) is the script's business.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.run.guards import NonFiniteLoss, check_finite_loss
from codistill_ds.run.watchdog import Watchdog


class TrainerWatchdog(Watchdog):
    """`Watchdog` whose resume hint names the Trainer's checkpoints, not the CLI's."""

    def _checkpoint_hint(self) -> str:
        path = self._latest()
        if path is None:
            return "no checkpoint yet (set save_strategy='steps' and save_steps)"
        return f"last checkpoint: {path} (continue with trainer.train(resume_from_checkpoint=True))"


class TrainerGuard:
    """Owns the watchdog of one rank for the duration of `Trainer.train()`."""

    def __init__(self, run_dir: str, dims: ParallelDims, peer_timeout_s: float, slow_timeout_s: float,
                 latest_checkpoint=None) -> None:
        self.run_dir, self.dims = run_dir, dims
        self.peer_timeout_s, self.slow_timeout_s = peer_timeout_s, slow_timeout_s
        self._latest = latest_checkpoint
        self.watchdog: TrainerWatchdog | None = None

    @contextmanager
    def training(self) -> Iterator[None]:
        """Around `Trainer.train()`: a diverged group exits 4, a lost peer exits 3 (one line each)."""
        self.watchdog = TrainerWatchdog(self.run_dir, self.dims, self.peer_timeout_s, self.slow_timeout_s,
                                        self._latest).start()
        try:
            yield
        except NonFiniteLoss as err:
            self.watchdog.stop_group(err)  # exits
            raise
        except Exception as err:
            self.watchdog.fail(err)  # exits when a peer rank or group is gone; else a bug: traceback
            raise
        finally:
            self.watchdog.stop()
            self.watchdog = None

    def started(self, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.resumed(step)

    def step_done(self, loss: float, group, step: int) -> None:
        """After optimizer step `step`: my group stops here if any of its ranks saw a NaN/Inf loss."""
        try:
            check_finite_loss(loss, group, step)
        except NonFiniteLoss as err:  # the same check; the advice in TrainingArguments' words
            raise NonFiniteLoss(str(err).replace("optim.lr", "learning_rate").replace(
                "optim.warmup_steps", "warmup_steps")) from None
        if self.watchdog is not None:
            self.watchdog.completed(step)

    @contextmanager
    def slow(self, phase: str) -> Iterator[None]:
        """Evaluation, checkpoint saves: allowed the slow deadline (inside train() only)."""
        if self.watchdog is None:
            yield
            return
        with self.watchdog.slow(phase):
            yield
