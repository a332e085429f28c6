"""`make gpu-check`'s script without a GPU: the commands it would run, and that its settings make
a valid config for the world each mode starts (tests/gpu/gpu_check.py runs them on GPUs)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from codistill_ds.config import load_config
from codistill_ds.config.validation import validate
from launch import REPO

SCRIPT = REPO / "tests" / "gpu" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sets_of(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]


def test_one_job_on_several_gpus_is_a_valid_config(tmp_path):
    gc = load_script()
    for backend in ("zero3", "fsdp2"):
        (cmd, run_dir), = gc.jobs("one_job", 5, backend, tmp_path / "straight", None, [])
        assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and run_dir == tmp_path / "straight"
        cfg = load_config(str(gc.CONFIG), sets_of(cmd))
        validate(cfg, world_size=4, cuda_available=True)
        assert (cfg.backend.precision, cfg.codistill.async_exchange, cfg.codistill.staleness) == ("bf16", True, 1)
        assert cfg.train.save_interval == 15 and cfg.train.steps == 30
        (cmd, _), = gc.jobs("one_job", 5, backend, tmp_path / "resumed", 15, [])
        assert f"train.resume={tmp_path / 'straight' / 'checkpoints' / 'step_15'}" in sets_of(cmd)


def test_one_gpu_runs_each_group_as_its_own_torchft_job():
    out = subprocess.run([sys.executable, str(SCRIPT), "--gpus", "1", "--dry-run", "--out", "/tmp/x"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=True).stdout
    lines = out.splitlines()
    assert sum("codistill_ds.cli lighthouse --port" in ln for ln in lines) == 4  # per backend, per run
    train = [ln for ln in lines if " train " in ln]
    assert len(train) == 8 and all("--nproc_per_node 1" in ln for ln in train)
    for g in range(2):
        assert sum(f"codistill.group_id={g}" in ln and "codistill.transport=torchft" in ln
                   and "codistill.exchange_backend=gloo" in ln and f"/group{g}" in ln for ln in train) == 4
    assert lines[-1] == "gpu-check: dry run, nothing executed"


def test_figures_from_metrics():
    """The per-check figures from two runs' records (a resumed run that differs after step 2)."""
    gc = load_script()

    def rec(g, s, loss):
        return {"group": g, "step": s, "loss": loss, "tokens": 100 * s, "step_ms": 50.0, "alpha": 1.0,
                "distill_loss": 0.5, "cross_group_bytes": 10 * s}

    straight = {g: {s: rec(g, s, 5.0 - 0.5 * s) for s in range(1, 7)} for g in (0, 1)}
    resumed = {g: {s: rec(g, s, 5.0 - 0.5 * s + (0.25 if g == 1 and s == 5 else 0.0)) for s in (4, 5, 6)} for g in (0, 1)}
    rows = {name: (fig, ok) for name, fig, ok in gc.figures(straight, resumed, 3, {0: 2**30, 1: 2**31})}
    assert rows["group 0 tokens/s"] == ("2,000", True)
    assert rows["group 1 peak memory"] == ("2.00 GiB", True)
    assert rows["group 0 loss decreasing"] == ("4.000 -> 2.500", True)
    assert rows["exact resume from step 3"] == ("max |loss difference| 0.25 over 6 records", False)
