"""Checkpoints, resume and export.

Multi-rank (4 CPU ranks = 2 groups x 2, see ckpt_runs.py; the uninterrupted runs, both
backends from one launch, are shared with test_failures.py):
  - FSDP2 under `torchrun --max-restarts 1`, rank 2 SIGKILLed inside the save of step_8: the
    restart finds step_4 intact next to the half-written .tmp_step_8, resumes from it by itself
    and ends with the same losses, exchanged predictions and weights as the uninterrupted run.
  - export of each backend's final checkpoint (both through `codistill_ds.cli.main` in one
    process): logits equal the training replica's.
Single-process checks of the checkpoint files: unit/test_checkpoint_files.py.
(The ZeRO-3 kill-and-resume run is in test_failures.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from ckpt_runs import (
    STEPS,
    assert_same_training,
    overrides,
    results,
    run_torchrun,
    straight,
)

from codistill_ds.run import checkpoint
from launch import REPO, child_env


@pytest.mark.timeout(900)
def test_crash_during_save_keeps_previous_checkpoint_and_restart_resumes(tmp_path):
    ref = straight("fsdp")
    res = run_torchrun(tmp_path, overrides(tmp_path / "run", "fsdp"), "--max-restarts", "1",
                       FAULT="save:2:8")
    for r in res:  # every rank: restarted once, found the interrupted save, resumed at step 4
        assert r["restarts"] == 1 and r["start_step"] == 4, r
        assert r["checkpoints_at_start"] == [".tmp_step_8", "step_4"], r
    assert_same_training(ref, tmp_path, first_step=4)
    found = checkpoint.complete_checkpoints(str(tmp_path / "run"))
    assert [s for s, _ in found] == [4, STEPS]
    assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.startswith(".")]


EXPORTS = [("deepspeed", 1), ("fsdp", 0)]
EXPORT_BOTH = """
import json, sys
from codistill_ds import cli
codes = [cli.main(json.loads(argv)) for argv in sys.argv[1:]]
sys.exit(f"exit codes {codes}" if any(codes) else 0)
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each backend's export, both from one process (`codistill-ds export` is `cli.main`, which
    returns the command's exit code): {backend: the exported folder}."""
    tmp = tmp_path_factory.mktemp("export")
    argvs = [["export", str(straight(b) / "run"), "--group", str(g), str(tmp / b / "hf")] for b, g in EXPORTS]
    proc = subprocess.run([sys.executable, "-c", EXPORT_BOTH, *map(json.dumps, argvs)], cwd=REPO, env=child_env(),
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {b: tmp / b / "hf" for b, _ in EXPORTS}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend,group", EXPORTS)
def test_export_round_trip(exports, backend, group):
    from transformers import AutoModelForCausalLM

    out = straight(backend)
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(str(out / "run")))
    assert meta["step"] == STEPS and meta["backend"] == backend and meta["groups"] == 2
    tmp_path = exports[backend].parent
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trained = torch.load(out / f"logits_group{group}.pt")
    with torch.no_grad():
        logits = model(input_ids=trained["tokens"][:, :-1]).logits
    diff = (logits - trained["logits"]).abs().max().item()
    print(f"{backend} group {group}: max |exported - trained| logit = {diff:.3g}")
    assert diff <= 1e-5
    info = json.loads((tmp_path / "hf" / "codistill_export.json").read_text())
    assert info["group"] == group and info["step"] == STEPS
    # the two groups are different models: the other group's logits must not match
    other = torch.load(out / f"logits_group{1 - group}.pt")
    assert not torch.allclose(other["logits"], trained["logits"], atol=1e-3)


@pytest.mark.timeout(900)
def test_straight_run_checkpoint_contents():
    out = straight("deepspeed")
    run = out / "run"
    assert [s for s, _ in checkpoint.complete_checkpoints(str(run))] == [4, STEPS]
    for step in (4, STEPS):
        path = run / "checkpoints" / f"step_{step}"
        for g in (0, 1):
            assert sorted(p.name for p in (path / f"group_{g}").glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
            state = torch.load(path / f"group_{g}" / "rank_0.pt", weights_only=False)
            assert state["step"] == step and set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
            # staleness 2: the targets of the two exchanges before the save are in flight
            assert sorted(state["loop"]["pending"]) == [step, step + 1]
    for r in results(out):
        assert r["start_step"] == 0 and len(r["sent"]) == STEPS


# ---- single process: which checkpoint, atomic commit, metrics ----------------------------------











