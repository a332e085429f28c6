"""`make test` runs every test file under tests/.

pytest skips folders named like build outputs by default (`dist` among them), so `pytest tests`
once collected tests/unit alone and passed in a minute while tests/dist, every multi-process
test, never ran. This lists what pytest collects from the Makefile's command line and compares
it with the test files on disk.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_make_test_collects_every_test_file() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {line.split("::", 1)[0] for line in proc.stdout.splitlines() if "::" in line}
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    assert on_disk - collected == set(), "test files that `make test` never runs"
    assert any(f.startswith("tests/dist/") for f in collected) and any(f.startswith("tests/unit/") for f in collected)
