"""`python -m benchmarks.quality --smoke`, run once per session for every test that reads it.

The smoke setting trains every regime of the mode (the shakespeare arms and the one-pass pair);
test_quality_bench.py checks the first, test_onepass_compare.py the second: both read one run
(the one-pass regime reads the built-in corpus, not `--data`), instead of training the one-pass
pair twice. The run is a background launch (tests/background.py) both modules name
(`pytest.mark.background("quality_smoke")`): it starts niced with the session, their tests run
last. Niced, an arm can be starved while its peer waits, so every run of the benchmark here gets
the patience of a slow peer (PATIENCE: an hour per run, exchange and peer timeouts of 30-60 min;
none changes a number while no round times out)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from codistill_ds.distributed.launching import REPO

KEY = "quality_smoke"
PATIENCE = ["--run-timeout-s", "3600", "--set", "codistill.exchange_timeout_s=1800",
            "--set", "backend.peer_timeout_s=3600", "--set", "backend.timeout_s=3600"]


def write_corpus(folder: Path) -> Path:
    """A few tens of KB of real text present on every machine: the stdlib's argparse source."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.txt"
    path.write_text(Path(argparse.__file__).read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def command(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.quality", "--data", str(corpus), "--out", str(out), "--smoke",
            *PATIENCE, *extra]


def background_launch(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The session's full `--smoke` run: every regime, every arm, into tmp/quality."""
    return command(write_corpus(tmp), tmp / "quality"), {}


def bench(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the smoke setting again (some arms, or into another folder); on timeout SIGTERM it,
    so it takes its running launch down too."""
    cmd = command(corpus, out, *extra)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"benchmark timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
