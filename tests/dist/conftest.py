"""Session-wide runs that several modules of tests/dist read (tests/quality_smoke.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from quality_smoke import bench, write_corpus


@pytest.fixture(scope="session")
def quality_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def quality_smoke(quality_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The out dir of one full `--smoke` run: every regime, every arm."""
    out = tmp_path_factory.mktemp("quality")
    proc = bench(quality_corpus, out)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out
