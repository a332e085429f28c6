"""End to end: `python -m benchmarks.quality --smoke` trains every arm through the real CLI.

The smoke setting (tiny Llama, 30 updates, 20 KB of text) checks the benchmark's machinery, not
the quality numbers: every arm runs, writes its files, and learns; codistill arms exchange
(bytes, agreement) and sync does not; a failing run stops the benchmark loudly.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from codistill_ds.launching import REPO

ARMS = ["sync", "codistill", "codistill-unadjusted", "independent", "codistill-stale",
        "codistill-stale-weights"]

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few tens of KB of real text present on every machine: the stdlib's argparse source."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(Path(argparse.__file__).read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def bench(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the smoke setting; on timeout SIGTERM it, so it takes its running launch down too."""
    cmd = [sys.executable, "-m", "benchmarks.quality", "--data", str(corpus), "--out", str(out), "--smoke", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"benchmark timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def smoke(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    proc = bench(corpus, out)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def test_writes_results_table_and_plot(smoke: Path) -> None:
    results = json.loads((smoke / "results.json").read_text())
    assert list(results["arms"]) == ARMS
    for name, arm in results["arms"].items():
        assert len(arm["per_group"]) == (1 if name == "sync" else 2), name
        for key in ("final_val_loss", "best_val_loss", "wall_s", "cross_group_bytes"):
            assert math.isfinite(arm[key]), (name, key)
        assert arm["best_val_loss"] <= arm["final_val_loss"], name
        assert [s for s, _ in arm["val_curve"]] == [10, 20, 30], name
    png = (smoke / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000
    table = (smoke / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ARMS)


def test_every_arm_learns(smoke: Path) -> None:
    """Training loss falls, and validation ends well below uniform over bytes (ln 256 = 5.55)."""
    for name, arm in json.loads((smoke / "results.json").read_text())["arms"].items():
        for model in arm["per_group"]:
            assert model["final_loss"] < model["first_loss"] - 0.3, (name, model)
            first_val = model["val_history"][0][1]
            assert model["best_val_loss"] < min(first_val, math.log(256) - 1.0), (name, model)


def test_only_codistill_arms_exchange(smoke: Path) -> None:
    arms = json.loads((smoke / "results.json").read_text())["arms"]
    assert arms["sync"]["cross_group_bytes"] == 0 and arms["sync"]["agreement"] is None
    for name in ARMS[1:]:
        assert arms[name]["cross_group_bytes"] > 0 and 0 <= arms[name]["agreement"] <= 1, name
    # The stale arm exchanges every 10th of the 30 updates: a tenth of the every-step bytes.
    ratio = arms["codistill-stale"]["cross_group_bytes"] / arms["codistill"]["cross_group_bytes"]
    assert ratio == pytest.approx(0.1)


def test_a_failing_run_stops_the_benchmark(corpus: Path, tmp_path: Path) -> None:
    proc = bench(corpus, tmp_path, "--arms", "sync", "--set", "model.num_heads=3")
    assert proc.returncode != 0
    assert "num_heads" in proc.stderr and "stderr tail" in proc.stderr
    assert not (tmp_path / "results.json").exists()
