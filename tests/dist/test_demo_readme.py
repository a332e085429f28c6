"""The README's `make demo` table is what the demo prints: a fresh run of its exact command, row
for row (losses, agreement, cross-group bytes, the shape line); only the wall time may differ."""

from __future__ import annotations

import re

import pytest

from launch import REPO, child_env, run_captured

DEMO = ["codistill-ds", "train", "--config", "examples/tiny_cpu.yaml", "--nproc", "4"]


def _table(text: str) -> list[str]:
    """The end-of-run table: header, rule, one row per group, the shape line without its time."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("group train loss"))
    end = next(i for i in range(start, len(lines)) if re.match(r"\d+ groups x \d+ ranks", lines[i]))
    return lines[start:end] + [re.sub(r", [\d.]+s$", "", lines[end])]


@pytest.mark.timeout(900)
def test_readme_demo_table_is_what_make_demo_prints(tmp_path):
    readme = (REPO / "README.md").read_text()
    quoted = _table(readme.split("make demo` trains", 1)[1])
    demo = run_captured([str(REPO / ".venv" / "bin" / DEMO[0]), *DEMO[1:], "--run-dir", str(tmp_path / "demo")],
                        840, cwd=REPO, env=child_env())
    assert demo.returncode == 0, demo.stderr[-4000:]
    assert _table(demo.stdout) == quoted
