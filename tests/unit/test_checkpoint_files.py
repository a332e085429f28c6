"""Checkpoint files without a job: choosing the checkpoint to resume from, atomic commit and
pruning, metrics truncation, export's errors. (Saving and resuming real runs: dist/test_checkpoint.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codistill_ds.config import ConfigError, load_config
from codistill_ds.run import checkpoint


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


@pytest.mark.parametrize("override, field, saved, now", [
    ("backend.name=fsdp", "backend.name", "deepspeed", "fsdp"),
    ("codistill.groups=4", "codistill.groups", "2", "4"),
    ("codistill.enabled=false", "codistill.groups", "2", "1"),
    ("model.num_layers=3", "model", "'num_layers': 2", "'num_layers': 3"),
    ("model.arch=gpt2", "model", "'arch': 'llama'", "'arch': 'gpt2'"),
])
def test_resume_refuses_every_incompatible_field_in_one_line(tmp_path, override, field, saved, now):
    """Issue 24, item 7: `check_compatible` beyond a world-size mismatch. Each field whose
    change makes the shards unreadable (backend, groups, the model) is refused before anything
    loads, in one line naming the field and both values; a change that is only a new setting
    (the learning rate, the steps) resumes."""
    run = tmp_path / "run"
    _fake_checkpoint(run, 4, world=8)
    cfg = load_config(None, [f"run_dir={run}", "train.resume=auto", override])
    with pytest.raises(ConfigError) as info:
        checkpoint.resolve_resume(cfg, 8, 0)
    message = str(info.value)
    assert info.value.field == field and "\n" not in message, message
    assert f"saved with {field}=" in message and saved in message and now in message, message
    ok = load_config(None, [f"run_dir={run}", "train.resume=auto", "optim.lr=0.5", "train.steps=99"])
    assert checkpoint.resolve_resume(ok, 8, 0).path.endswith("step_4")


def test_weights_mode_refuses_to_resume_in_one_line(tmp_path):
    """Issue 24, item 6: weight exchange keeps its teachers (the peers' frozen copies) outside
    the checkpoint, so a resumed run would distill toward freshly built teachers until its next
    exchange and could not end where the uninterrupted run ends. A resume is refused at
    validation, on every rank, naming train.resume; starting fresh is accepted."""
    from codistill_ds.config.validation import validate

    run = tmp_path / "run"
    _fake_checkpoint(run, 4)
    base = ["codistill.mode=weights", "backend.name=fsdp", f"run_dir={tmp_path / 'new'}"]
    for resume in ("auto", str(run)):
        with pytest.raises(ConfigError) as info:
            validate(load_config(None, [*base, f"train.resume={resume}"]), world_size=4, vocab_size=256)
        message = str(info.value)
        assert info.value.field == "train.resume" and "\n" not in message, message
        assert "weights" in message and "teachers" in message, message
    validate(load_config(None, base), world_size=4, vocab_size=256)


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

