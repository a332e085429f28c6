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


def test_tp_flow_configs_are_valid_for_their_worlds(tmp_path):
    """The T=1 run is 2 groups x 1 rank, the T=2 run 2 groups x 2 TP ranks (FSDP2, fp32, rails,
    synchronous exchange), on the GPU config and on the CPU settings."""
    gc = load_script()
    for mode, sets in (("one_job", []), ("cpu", gc.CPU_SETS)):
        (c1, d1), (c2, d2) = gc.tp_jobs(mode, tmp_path, sets)
        assert (d1, d2) == (tmp_path / "tp1", tmp_path / "tp2")
        for cmd, tp in ((c1, 1), (c2, 2)):
            nproc = int(cmd[cmd.index("--nproc_per_node") + 1])
            assert nproc == 2 * tp
            cfg = load_config(str(gc.CONFIG), sets_of(cmd))
            validate(cfg, world_size=nproc, vocab_size=256, cuda_available=True)
            assert (cfg.parallel.tp, cfg.backend.name, cfg.backend.precision, cfg.codistill.dtype) == (tp, "fsdp", "fp32", "fp32")
            assert (cfg.codistill.staleness, cfg.codistill.async_exchange, cfg.train.save_interval) == (0, False, 0)
            assert cfg.train.steps == (20 if mode == "one_job" else 6)


def test_tp_is_skipped_with_one_line_below_four_gpus():
    for gpus in (1, 2, 3):
        out = subprocess.run([sys.executable, str(SCRIPT), "--gpus", str(gpus), "--dry-run", "--backends", "tp",
                              "--out", "/tmp/x"], capture_output=True, text=True, timeout=120, cwd=REPO, check=True).stdout
        skipped = [ln for ln in out.splitlines() if "skipped" in ln]
        assert skipped == [f"gpu-check: tp    skipped: K=2 groups x T=2 needs 4 GPUs, this machine has {gpus} GPU(s)"]
        assert " train " not in out


def test_tp_figures_from_metrics():
    gc = load_script()

    def rec(g, s, loss, distill=0.5):
        return {"group": g, "step": s, "loss": loss, "alpha": 1.0, "distill_loss": distill}

    t1 = {g: {s: rec(g, s, 5.0 - 0.1 * s) for s in range(1, 5)} for g in (0, 1)}
    t2 = {g: {s: rec(g, s, 5.0 - 0.1 * s + (2e-6 if (g, s) == (1, 3) else 0.0)) for s in range(1, 5)} for g in (0, 1)}
    rows = {name: (fig, ok) for name, fig, ok in gc.tp_figures(t1, t2, {0: 10, 1: 10}, {0: 10, 1: 10},
                                                               {0: 2**30, 1: 2**30}, {0: 2**29, 1: 2**29}, 1e-5)}
    assert rows["T=2 vs T=1 loss"] == ("max |difference| 2e-06 over 8 records", True)
    assert rows["T=2 vs T=1 distill_loss"][1] and rows["T=2 distillation active"] == ("0.5, 0.5", True)
    assert rows["T=2 vs T=1 cross-group bytes"] == ("20 vs 20", True)
    assert rows["group 1 peak memory T=2 / T=1"] == ("0.50 / 1.00 GiB", True)
    bad = gc.tp_figures(t1, t2, {0: 10, 1: 10}, {0: 20, 1: 10}, {0: 1}, {0: 1}, 1e-6)
    assert [ok for _, _, ok in bad][:4] == [False, True, True, False]


def test_tp_flow_runs_on_cpu(tmp_path):
    """The real thing on 4 + 2 gloo ranks (6 steps each): T=2 gives T=1's losses and bytes."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--backends", "tp", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("gpu-check: tp ") and ln.endswith(("PASS", "FAIL"))]
    assert out.returncode == 0 and len(lines) == 6 and all(ln.endswith("PASS") for ln in lines), out.stdout + out.stderr[-3000:]
