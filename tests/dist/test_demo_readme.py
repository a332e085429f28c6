"""The README's `make demo` table is what the demo prints: a fresh run of its exact command, row
for row (losses, agreement, cross-group bytes, the shape line); only the wall time may differ.

The run starts niced when the session does (tests/background.py) and fills the cores the rest
of the suite leaves idle; this test runs last and waits for it. Niced, a group can be starved
while its peer waits at an exchange, so the run is given the patience a slow peer needs
(exchange timeout 30 min, peer and process-group timeouts an hour; none changes a number while no
round times out)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch import REPO

DEMO = ["codistill-ds", "train", "--config", "examples/tiny_cpu.yaml", "--nproc", "4"]
PATIENCE = ["--set", "codistill.exchange_timeout_s=1800", "backend.peer_timeout_s=3600", "backend.timeout_s=3600"]

pytestmark = pytest.mark.background


def background_launch(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return [str(REPO / ".venv" / "bin" / DEMO[0]), *DEMO[1:], "--run-dir", str(tmp / "demo"), *PATIENCE], {}


def _table(text: str) -> list[str]:
    """The end-of-run table: header, rule, one row per group, the shape line without its time."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("group train loss"))
    end = next(i for i in range(start, len(lines)) if re.match(r"\d+ groups x \d+ ranks", lines[i]))
    return lines[start:end] + [re.sub(r", [\d.]+s$", "", lines[end])]


@pytest.mark.timeout(900)
def test_readme_demo_table_is_what_make_demo_prints(background_run):
    readme = (REPO / "README.md").read_text()
    quoted = _table(readme.split("make demo` trains", 1)[1])
    demo = background_run.result(840)
    assert demo.returncode == 0, demo.stderr[-4000:]
    assert _table(demo.stdout) == quoted
