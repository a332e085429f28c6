"""`RUN_DIR/metrics.jsonl` and `RUN_DIR/summary.json`: the run's record, one writer per group.

Each group's leader appends its group's records; every line is written with a single `write`
on a file opened with O_APPEND, so lines from different groups never interleave mid-record.
Record fields (docs/design.md): step, group, loss, distill_loss, alpha, val_loss (when evaluated),
agreement, cross_group_bytes (cumulative, sent by the writing rank), exchange_ms, step_ms, tokens,
skipped_peers (cumulative count of peer predictions dropped: NaN/Inf, malformed, unauthenticated
or refused by the peer guard, see exchange/guard.py) and skipped_reasons (that count by reason),
peers (peer groups whose predictions the latest completed exchange delivered; with independent
groups this is the live peer count), exchange_compute_ms (teacher forward + compression of this
step's exchange), cpu_ms (CPU time of the step's training and exchange work, every thread of
every rank of the group summed: the compute bill of an update), wall_s (seconds since the loop
started in this process).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends records for one group; inert on ranks that are not their group's leader.

    `report_to` (train.report_to) adds dashboards fed the same records (dashboards.py): the
    loop only ever calls `write`. They are closed by `close`, which also runs when the process
    leaves through `dist.exit_process` or the interpreter exits."""

    def __init__(self, run_dir: str, enabled: bool, report_to: list[str] = (), group: int = 0) -> None:
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.enabled = enabled
        self.sinks: list = []
        if enabled and any(name != "none" for name in report_to):
            from codistill_ds.distributed.env import on_exit
            from codistill_ds.run.dashboards import open_sinks

            self.sinks = open_sinks(list(report_to), run_dir, group)
            on_exit(self.close)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if self.sinks:
            from codistill_ds.run.dashboards import scalars

            values = scalars(record)
            for sink in self.sinks:
                sink.write(int(record["step"]), values)

    def close(self) -> None:
        """Finish the dashboards (idempotent)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order, read while a job may be writing it.

    A missing file has no records yet. Records are appended one line at a time, so only the last
    line can be torn (a reader polling a running job can see half of it): it is left out until
    it is complete. A line that does not parse anywhere else is a corrupt file, and raises."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline yet: a record being written
                break
            raise
    return out


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All complete records of a run dir's metrics.jsonl, in file order."""
    return read_records(os.path.join(run_dir, METRICS_FILE))


def write_summary(run_dir: str, summary: dict[str, Any]) -> None:
    """Written once by global rank 0 after the last step, atomically (rename)."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=_clean)
    os.replace(tmp, path)
