"""The library's logging: one logger per module under `codistill_ds`, one handler at its root.

Messages a user may want to filter (a peer skipped, a round dropped, which groups are present)
go through `logging.getLogger(__name__)`; the one-line errors a run ends with stay prints
(`run/watchdog.stop_process`). The root `codistill_ds` logger writes `codistill-ds: warning: ...`
lines to stderr, like transformers' library logger; set `CODISTILL_DS_LOG_LEVEL` (e.g.
`ERROR`) or `logging.getLogger("codistill_ds.exchange").setLevel(...)` to quiet parts of it.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "codistill_ds"


class _Format(logging.Formatter):
    """`codistill-ds: message` for information, `codistill-ds: warning: message` otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return f"codistill-ds: {record.getMessage()}"
        return f"codistill-ds: {record.levelname.lower()}: {record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest and launchers replace it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


def configure() -> None:
    """Give the library's root logger its stderr handler once (idempotent)."""
    root = logging.getLogger(ROOT)
    if any(isinstance(h, _Stderr) for h in root.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(_Format())
    root.addHandler(handler)
    root.setLevel(os.environ.get("CODISTILL_DS_LOG_LEVEL", "INFO").upper())
    root.propagate = False
