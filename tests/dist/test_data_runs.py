"""The real CLI training from token shards and from a stream, with dashboards (2 groups x 1 rank).

- From shards, straight: 30 steps with TensorBoard and W&B (offline). Each group's leader wrote
  RUN_DIR/tb/group{g} with one scalar per numeric metrics.jsonl field at every record's step
  (read back with tensorboard's EventAccumulator), and one offline W&B run per group whose
  history equals metrics.jsonl (read from the run file, tests/dashboard_logs.py).
- From shards, interrupted: rank 0 SIGKILLed when the save of step_20 begins
  (tests/workers/cli_killed_at_save.py), torchrun takes the other rank down, then `--resume`
  from step_10: every record equals the straight run's (losses, validation, agreement, bytes),
  and the resumed TensorBoard log shows one value per step, the straight run's (purge_step
  hides the killed attempt's events of steps 11-20).
- Streamed (`data.streaming`): a short run trains and logs from the same text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dashboard_logs import tensorboard_scalars, wandb_history

from benchmarks.data.corpus import make_corpus
from codistill_ds.data.tokenize import tokenize_files
from launch import REPO, WORKERS, cli, read_jsonl, torchrun

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
STEPS, SAVE = 30, 10
SCALARS = {"loss", "distill_loss", "alpha", "val_loss", "agreement", "cross_group_bytes", "exchange_ms",
           "step_ms", "tokens"}
COMPARED = ("loss", "distill_loss", "alpha", "val_loss", "agreement", "cross_group_bytes", "tokens")
DASHBOARDS = "train.report_to=[tensorboard,wandb]"


def sets(run_dir: Path, data: Path, *extra: str) -> list[str]:
    items = [f"data.train_files=[{data}]", f"train.steps={STEPS}", f"train.save_interval={SAVE}",
             "train.eval_interval=5", "codistill.alpha=1", DASHBOARDS, *extra]
    return ["--config", CONFIG, "--run-dir", str(run_dir), *[a for s in items for a in ("--set", s)]]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("text") / "corpus.txt", 400_000)


@pytest.fixture(scope="module")
def shards(text) -> Path:
    out = text.parent / "shards"
    tokenize_files([str(text)], str(out), shard_tokens=100_000)
    return out


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = cli(2, "train", *sets(run, shards), timeout=400, WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run


def by_group_step(run: Path) -> dict[tuple[int, int], dict]:
    return {(r["group"], r["step"]): r for r in read_jsonl(run / "metrics.jsonl")}


@pytest.mark.timeout(420)
def test_dashboards_per_group(straight):
    records = by_group_step(straight)
    assert {g for g, _ in records} == {0, 1} and {s for _, s in records} == set(range(1, STEPS + 1))
    for g in (0, 1):
        tb = tensorboard_scalars(straight / "tb" / f"group{g}")
        assert SCALARS <= set(tb), sorted(tb)
        for (group, step), rec in records.items():
            if group != g:
                continue
            for name in SCALARS & rec.keys():
                assert tb[name][step] == [pytest.approx(rec[name], rel=1e-6, abs=1e-6)], (g, step, name)
        runs = list((straight / "wandb" / f"group{g}" / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        history = wandb_history(runs[0])
        assert sorted(history) == list(range(1, STEPS + 1))
        for step, row in history.items():
            rec = records[g, step]
            flat = {k: v for k, v in rec.items() if k not in ("step", "group") and v is not None
                    and not isinstance(v, dict)}  # counts by name: one scalar each, field/name
            flat.update((f"{k}/{name}", x) for k, v in rec.items() if isinstance(v, dict) for name, x in v.items())
            assert row == flat


@pytest.mark.timeout(600)
def test_interrupted_run_resumes_exactly(straight, shards, tmp_path):
    run = tmp_path / "run"
    killed = torchrun(2, [str(WORKERS / "cli_killed_at_save.py"), str(2 * SAVE), *sets(run, shards)],
                      timeout=400, WANDB_MODE="offline")
    assert killed.returncode != 0 and not (run / "summary.json").exists(), killed.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == [f"step_{SAVE}"]
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 2 * SAVE  # abandoned: 11..20
    proc = cli(2, "train", *sets(run, shards), "--resume", timeout=400, WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ref, got = by_group_step(straight), by_group_step(run)
    assert ref.keys() == got.keys()
    for key, rec in ref.items():
        for name in COMPARED:
            assert got[key].get(name) == rec.get(name), (key, name, got[key].get(name), rec.get(name))
    for g in (0, 1):
        tb = tensorboard_scalars(run / "tb" / f"group{g}")
        assert tb["loss"] == {s: [pytest.approx(ref[g, s]["loss"], rel=1e-6)] for s in range(1, STEPS + 1)}
        assert len(list((run / "wandb" / f"group{g}" / "wandb").glob("offline-run-*"))) == 2


@pytest.mark.timeout(420)
def test_streamed_corpus_trains(text, tmp_path):
    run = tmp_path / "run"
    proc = cli(2, "train", *sets(run, text, "data.streaming=true", "train.steps=4", "train.save_interval=0",
                                  "train.eval_interval=2", "train.report_to=[none]"), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = by_group_step(run)
    assert set(records) == {(g, s) for g in (0, 1) for s in range(1, 5)}
    assert all(r["loss"] > 0 and r["distill_loss"] is not None for r in records.values())
    assert records[0, 4]["val_loss"] > 0 and records[0, 4]["val_loss"] != records[1, 4]["val_loss"]
    assert not (run / "tb").exists()
