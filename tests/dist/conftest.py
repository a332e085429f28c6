"""Session-wide runs that several modules of tests/dist read (tests/quality_smoke.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from background import BackgroundLaunch


@pytest.fixture(scope="module")
def quality_corpus(background_run: BackgroundLaunch) -> Path:
    """The corpus the session's `--smoke` run read (a rerun into its folder must read it too)."""
    return background_run.tmp / "corpus.txt"


@pytest.fixture(scope="module")
def quality_smoke(background_run: BackgroundLaunch) -> Path:
    """The out dir of the session's full `--smoke` run: every regime, every arm."""
    proc = background_run.result(1700)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return background_run.tmp / "quality"
