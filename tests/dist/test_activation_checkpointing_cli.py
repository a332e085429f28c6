"""`model.activation_checkpointing` in the CLI job, DeepSpeed ZeRO-3 and FSDP2: the same losses
with and without, and the peak resident memory of a step with each mode.

One launch, started niced with the session (tests/background.py; its tests run last):
tests/workers/ac_cli_check.py on 4 ranks (K = 2 groups of 2, codistilling with
alpha 1 and an exchange every step, attention dropout 0.1 so the recomputed forward must draw
the masks of the first), six runs (2 backends x none/full/selective) of 3 steps each,
built and run through `run.job.build_job` and the loop, as `codistill-ds train` runs them.
Figures: benchmarks/RESULTS_ac.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codistill_ds.distributed.launching import torchrun_argv
from launch import WORKERS

pytestmark = [pytest.mark.timeout(1200), pytest.mark.background]

TOL = 1e-6


def background_launch(tmp: Path) -> tuple[list[str], dict[str, str]]:
    out = tmp / "ac_cli"
    out.mkdir(parents=True)
    return (torchrun_argv(4, [str(WORKERS / "ac_cli_check.py"), str(out)]),
            {"MALLOC_MMAP_THRESHOLD_": "65536"})  # freed tensors go back to the system


@pytest.fixture(scope="module")
def runs(background_run):
    proc = background_run.result(1100)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = background_run.tmp / "ac_cli"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    return {(r["rank"], run["backend"], run["ac"]): run for r in results for run in r["runs"]}


def test_same_losses_with_and_without(runs):
    """Every step's loss and distillation loss (group means, both groups) under "full" and
    "selective" equal "none"'s to 1e-6 (measured: bit for bit), on both backends; the layers
    are really checkpointed (all 4, or every other one)."""
    for (rank, backend, ac), run in runs.items():
        assert len(run["loss"]) == 3 and all(d is not None and d > 0 for d in run["distill_loss"][1:]), run
        ref = runs[(rank, backend, "none")]
        for key in ("loss", "distill_loss"):
            assert max(abs(a - b) for a, b in zip(run[key], ref[key])) <= TOL, (rank, backend, ac, key)
        assert run["wrapped"] == {"none": [], "full": list(range(4)), "selective": [1, 3]}[ac], run["wrapped"]


def test_checkpointing_lowers_the_peak(runs):
    """Measured here (4.1M parameters, 4 layers, 4 x 128 tokens per rank, dropout 0.1): ZeRO-3
    139 MB without, 47 MB "full" (0.34), 102 MB "selective" (0.73); FSDP2 138 / 57 (0.41) /
    109 MB (0.79); the 8-layer model before gave 0.29 / 0.63 and 0.25 / 0.66."""
    lines = []
    for rank in range(4):
        for backend in ("zero3", "fsdp"):
            none, full, sel = (runs[(rank, backend, m)]["peak_above_baseline"] for m in ("none", "full", "selective"))
            assert full < 0.5 * none and full < sel < 0.85 * none, (rank, backend, none, full, sel)
            lines.append(f"rank {rank} {backend}: none {none / 1e6:.0f} MB, full {full / 1e6:.0f} MB "
                         f"({full / none:.2f}), selective {sel / 1e6:.0f} MB ({sel / none:.2f})")
    print("\n" + "\n".join(lines))
