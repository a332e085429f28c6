"""`python -m benchmarks.quality --smoke`, run once per session for every test that reads it.

The smoke setting trains every regime of the mode (the shakespeare arms and the one-pass pair);
test_quality_bench.py checks the first, test_onepass_compare.py the second: both read one run
(the one-pass regime reads the built-in corpus, not `--data`), instead of training the one-pass
pair twice."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from codistill_ds.distributed.launching import REPO


def write_corpus(folder: Path) -> Path:
    """A few tens of KB of real text present on every machine: the stdlib's argparse source."""
    path = folder / "corpus.txt"
    path.write_text(Path(argparse.__file__).read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def bench(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the smoke setting; on timeout SIGTERM it, so it takes its running launch down too."""
    cmd = [sys.executable, "-m", "benchmarks.quality", "--data", str(corpus), "--out", str(out), "--smoke", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"benchmark timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
