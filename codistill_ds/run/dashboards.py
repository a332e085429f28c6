"""TensorBoard and Weights & Biases views of metrics.jsonl (`train.report_to`).

Each group is one run, written by the group's leader, so the dashboards overlay the K replicas
the way `codistill-ds plot` does: TensorBoard reads RUN_DIR/tb/group{g}, W&B gets one run per
group named RUN-group{g} in the group RUN (the run dir's name). Every numeric field of a record
becomes a scalar under its metrics.jsonl name at the record's step (loss, distill_loss, alpha,
val_loss, agreement, cross_group_bytes, exchange_ms, step_ms, tokens, ... and whatever fields
the loop adds later): nothing here lists them.

W&B runs offline unless WANDB_MODE says otherwise (no network, no account: `wandb sync
RUN_DIR/wandb/group{g}/wandb/offline-run-*` uploads later). On resume, TensorBoard hides the
abandoned attempt's events from the first resumed step on (`purge_step`); W&B starts a new run.
Both packages are imported only when asked for (pip install 'codistill_ds[dashboards]').
"""

from __future__ import annotations

import os
from typing import Any

import yaml

NOT_SCALARS = ("step", "group")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields (not bools, not None, not the step/group keys); a field that
    holds counts by name (`skipped_reasons`) becomes one scalar per name, `field/name`, so a
    dashboard charts each reason on its own."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in NOT_SCALARS:
            continue
        if isinstance(v, dict):
            out.update((f"{k}/{name}", float(x)) for name, x in v.items() if _number(x))
        elif _number(v):
            out[k] = float(v)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TensorBoardSink:
    """RUN_DIR/tb/group{g} through torch.utils.tensorboard (needs the `tensorboard` package)."""

    def __init__(self, run_dir: str, group: int) -> None:
        self.logdir = os.path.join(run_dir, "tb", f"group{group}")
        self._writer = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:  # the first step written: a resumed run hides newer stale events
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.logdir, purge_step=step)
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()  # the process ends with os._exit (dist.exit_process): nothing buffered

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class WandbSink:
    """One W&B run per group under RUN_DIR/wandb/group{g}, offline unless WANDB_MODE is set."""

    def __init__(self, run_dir: str, group: int) -> None:
        import wandb

        name = os.path.basename(os.path.normpath(run_dir))
        root = os.path.join(run_dir, "wandb", f"group{group}")
        os.makedirs(root, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "codistill_ds"), group=name, name=f"{name}-group{group}",
            dir=root, mode=os.environ.get("WANDB_MODE", "offline"), config=_resolved_config(run_dir),
            reinit="create_new", settings=wandb.Settings(console="off", silent=True))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


def _resolved_config(run_dir: str) -> dict | None:
    """RUN_DIR/config.yaml, which global rank 0 writes before any writer exists (train.py)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


def open_sinks(report_to: list[str], run_dir: str, group: int) -> list:
    """The sinks `train.report_to` names ("none" and an empty list: none)."""
    return [SINKS[name](run_dir, group) for name in report_to if name != "none"]
