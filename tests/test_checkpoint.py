"""Checkpoints, resume and export.

Multi-rank (4 CPU ranks = 2 groups x 2, see ckpt_runs.py; the uninterrupted runs are shared
with test_failures.py):
  - FSDP2 under `torchrun --max-restarts 1`, rank 2 SIGKILLed inside the save of step_8: the
    restart finds step_4 intact next to the half-written .tmp_step_8, resumes from it by itself
    and ends with the same losses, exchanged predictions and weights as the uninterrupted run.
  - export of each backend's final checkpoint: logits equal the training replica's.
Single-process: choosing the checkpoint to resume from, atomic commit, metrics truncation.
(The ZeRO-3 kill-and-resume run is in test_failures.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
from codistill_ds.config import ConfigError, load_config
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


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend,group", [("deepspeed", 1), ("fsdp", 0)])
def test_export_round_trip(tmp_path, backend, group):
    from transformers import AutoModelForCausalLM

    out = straight(backend)
    meta = checkpoint.read_meta(checkpoint.latest_checkpoint(str(out / "run")))
    assert meta["step"] == STEPS and meta["backend"] == backend and meta["groups"] == 2
    proc = subprocess.run([sys.executable, "-m", "codistill_ds.cli", "export", str(out / "run"),
                           "--group", str(group), str(tmp_path / "hf")], cwd=REPO, env=child_env(), check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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

def _fake_checkpoint(run: Path, step: int, complete: bool = True, world: int = 4) -> Path:
    path = run / "checkpoints" / (f"step_{step}" if complete else f".tmp_step_{step}")
    path.mkdir(parents=True)
    meta = {"step": step, "world_size": world, "groups": 2, "group_size": world // 2,
            "backend": "deepspeed", "vocab_size": 256,
            "config": checkpoint.config_to_dict(load_config(None))}
    (path / checkpoint.META).write_text(json.dumps(meta))
    if complete:
        (path / checkpoint.COMPLETE).write_text("{}")
    return path


def _cfg(run: Path, resume: str = "none"):
    return load_config(None, [f"run_dir={run}", f"train.resume={resume}"])


def test_resume_choice(tmp_path):
    run = tmp_path / "run"
    assert checkpoint.resolve_resume(_cfg(run), 4, 0).path is None  # fresh start
    _fake_checkpoint(run, 4)
    _fake_checkpoint(run, 8)
    _fake_checkpoint(run, 12, complete=False)  # a save a crash interrupted
    (run / "checkpoints" / "step_16").mkdir()  # a step dir without its COMPLETE marker
    assert checkpoint.resolve_resume(_cfg(run, "auto"), 4, 0).path.endswith("step_8")
    assert checkpoint.resolve_resume(_cfg(run), 4, 2).path.endswith("step_8")  # restarted: auto
    with pytest.raises(ConfigError, match="already holds checkpoints.*step 8.*--resume"):
        checkpoint.resolve_resume(_cfg(run), 4, 0)
    with pytest.raises(ConfigError, match="no such checkpoint or run directory: /no/such"):
        checkpoint.resolve_resume(_cfg(run, "/no/such"), 4, 0)
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        checkpoint.resolve_resume(_cfg(run, str(run / "checkpoints" / "step_16")), 4, 0)
    with pytest.raises(ConfigError, match="newer checkpoints"):
        checkpoint.resolve_resume(_cfg(run, str(run / "checkpoints" / "step_4")), 4, 0)
    with pytest.raises(ConfigError, match="world_size.*saved with world_size=4.*has 2"):
        checkpoint.resolve_resume(_cfg(run, "auto"), 2, 0)
    elsewhere = tmp_path / "other"  # resume another run's checkpoint into a new run dir
    assert checkpoint.resolve_resume(_cfg(elsewhere, str(run)), 4, 0).path.endswith("step_8")


def test_commit_is_atomic_and_prune_keeps_newest(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _fake_checkpoint(run, step)
    tmp = _fake_checkpoint(run, 8, complete=False)
    (tmp / checkpoint.COMPLETE).unlink(missing_ok=True)
    # a crash before the commit: step_8 does not exist, step_6 is the newest
    assert checkpoint.latest_checkpoint(str(run)).endswith("step_6")
    checkpoint._commit(str(tmp), str(run / "checkpoints" / "step_8"), {"step": 8, "time": 0})
    assert checkpoint.latest_checkpoint(str(run)).endswith("step_8") and not tmp.exists()
    checkpoint.prune(str(run), keep=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(str(run))] == [6, 8]


def test_truncate_metrics_drops_abandoned_steps(tmp_path):
    lines = [json.dumps({"step": s, "group": g}) for s in range(1, 7) for g in (0, 1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "gro')
    checkpoint.truncate_metrics(str(tmp_path), 4)
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_export_errors_name_the_cause(tmp_path):
    from codistill_ds.commands.export import ExportError, export

    with pytest.raises(ExportError, match="no complete checkpoint.*save_interval"):
        export(str(tmp_path), 0, str(tmp_path / "out"))
    _fake_checkpoint(tmp_path, 4)
    with pytest.raises(ExportError, match="--group 5: the run has groups 0..1"):
        export(str(tmp_path), 5, str(tmp_path / "out"))
    with pytest.raises(ExportError, match="--step 3: no complete checkpoint of that step; have \\[4\\]"):
        export(str(tmp_path), 0, str(tmp_path / "out"), step=3)
