"""End to end: `python -m benchmarks.quality --smoke` trains one arm of each kind for real.

The smoke setting (tiny Llama, 30 updates, 20 KB of text) checks the benchmark's machinery, not
the quality numbers: every arm runs, writes its files, and learns; codistill arms exchange the
bytes their wire format says; the DiLoCo arm trains what the CLI trains until its first outer
step (the same losses as the `independent` arm's group 0) and then shares one model; a rerun
reuses finished runs; a failing run stops the benchmark loudly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from quality_smoke import KEY, background_launch, bench  # noqa: F401 (the session launch)

from benchmarks.quality.diloco import ring_bytes
from benchmarks.quality.report import add_gaps, paired_ref
from benchmarks.quality.settings import SMOKE, StopRule
from codistill_ds.exchange.wire import WireFormat

pytestmark = [pytest.mark.timeout(1800), pytest.mark.background(KEY)]


@pytest.fixture(scope="module")
def corpus(quality_corpus: Path) -> Path:
    return quality_corpus


@pytest.fixture(scope="module")
def smoke(quality_smoke: Path) -> Path:
    return quality_smoke


def arms_of(out: Path) -> dict:
    return json.loads((out / "shakespeare" / "results.json").read_text())["arms"]


def records(out: Path, run: str, group: int) -> list[dict]:
    lines = (out / "shakespeare" / "runs" / run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["group"] == group]


def test_writes_results_table_and_plot(smoke: Path) -> None:
    arms = arms_of(smoke)
    assert list(arms) == list(SMOKE)
    for name, arm in arms.items():
        assert len(arm["per_group"]) == (1 if name == "sync" else 2), name
        for key in ("final_val_loss", "best_val_loss", "process_s", "cross_group_bytes"):
            assert math.isfinite(arm[key]), (name, key)
        assert arm["best_val_loss"] <= arm["final_val_loss"], name
        assert [s for s, _ in arm["val_curve"]] == [10, 20, 30], name
    png = (smoke / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 300_000
    table = (smoke / "shakespeare" / "results.md").read_text()
    assert all(f"| {name} |" in table for name in SMOKE)


def test_every_arm_learns(smoke: Path) -> None:
    """Training loss falls, and validation ends well below uniform over bytes (ln 256 = 5.55)."""
    for name, arm in arms_of(smoke).items():
        for model in arm["per_group"]:
            assert model["final_loss"] < model["first_loss"] - 0.3, (name, model)
            first_val = model["val_history"][0][1]
            assert model["best_val_loss"] < min(first_val, math.log(256) - 1.0), (name, model)


def test_boundary_bytes(smoke: Path) -> None:
    """DiLoCo measured at the all-reduce it calls equals the ring formula for its fp32
    pseudo-gradients (3 outer steps in 30 updates, both workers), sync by that formula (measured
    at the collective boundary in test_comm_bench), codistill measured: top-1 fp8 costs what its
    wire format says relative to top-32 bf16."""
    arms = arms_of(smoke)
    params = arms["sync"]["params"]
    assert arms["sync"]["cross_group_bytes"] == 2 * 30 * ring_bytes(params)
    assert arms["diloco-h10"]["bytes_counted"] == "measured"
    assert arms["diloco-h10"]["cross_group_bytes"] == 2 * 3 * ring_bytes(params)
    for model in arms["diloco-h10"]["per_group"]:  # the count grows by one outer step's bytes at 10, 20, 30
        assert [b for _, b in model["bytes_history"]] == [2 * ring_bytes(params) * (s // 10)
                                                          for s, _ in model["bytes_history"]]
    assert arms["sync"]["agreement"] is None and arms["diloco-h10"]["agreement"] is None
    for name in ("codistill", "independent", "codistill-top1-fp8"):
        assert arms[name]["cross_group_bytes"] > 0 and 0 <= arms[name]["agreement"] <= 1, name
    # independent exchanges every 10th of the 30 updates, only to measure agreement
    assert arms["independent"]["cross_group_bytes"] / arms["codistill"]["cross_group_bytes"] == pytest.approx(0.1)
    per_token = {k: WireFormat.choose(k, 256, dtype).bytes_per_token for k, dtype in ((32, "bf16"), (1, "fp8"))}
    ratio = arms["codistill-top1-fp8"]["cross_group_bytes"] / arms["codistill"]["cross_group_bytes"]
    assert ratio == pytest.approx(per_token[1] / per_token[32])


def test_diloco_trains_like_the_cli_then_shares_one_model(smoke: Path) -> None:
    """Until its first outer step (update 10) a DiLoCo worker is a plain run of group 0's shard
    from group 0's initialization: its losses equal the CLI's `independent` group 0 (alpha 0).
    Step 1 checks model, init and batch; step 2 the inner optimizer and schedules (DeepSpeed's
    ZeRO-1 against torch AdamW: float rounding); later steps drift chaotically, 1e-3 relative.
    After each outer step both workers hold the same model: equal validation losses."""
    cli, worker = records(smoke, "independent-s1234", 0), records(smoke, "diloco-h10-s1234", 0)
    assert [r["step"] for r in worker[:10]] == list(range(1, 11))
    assert abs(cli[0]["loss"] - worker[0]["loss"]) < 1e-6
    assert abs(cli[1]["loss"] - worker[1]["loss"]) < 1e-5
    for a, b in zip(cli[:10], worker[:10]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), a["step"]
    other = records(smoke, "diloco-h10-s1234", 1)
    vals = [[(r["step"], r["val_loss"]) for r in w if "val_loss" in r] for w in (worker, other)]
    assert vals[0] == vals[1] and [s for s, _ in vals[0]] == [10, 20, 30]
    assert worker[-1]["outer_steps"] == 3 and worker[-1]["global_val_loss"] == worker[-1]["val_loss"]
    assert worker[10]["loss"] != pytest.approx(cli[10]["loss"], rel=1e-3)  # the outer step changed it


def test_rerun_reuses_finished_runs(corpus: Path, smoke: Path) -> None:
    before = (smoke / "shakespeare" / "runs" / "sync-s1234" / "done.json").read_text()
    proc = bench(corpus, smoke, "--arms", "sync")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (smoke / "shakespeare" / "runs" / "sync-s1234" / "done.json").read_text() == before
    assert list(arms_of(smoke)) == list(SMOKE)  # the other arms' results are kept


def test_stop_rule() -> None:
    rule = StopRule(rise=0.03, patience=100, evals=2)
    falling = [(s, 2.0 - s / 1000) for s in range(25, 1001, 25)]
    assert not rule.passed([falling])
    overfit = [(25, 2.0), (100, 1.5), (200, 1.56), (225, 1.55)]
    assert rule.passed([overfit])
    assert not rule.passed([overfit, falling])  # every model must have passed its minimum
    assert not rule.passed([[(25, 2.0), (100, 1.5), (150, 1.6), (175, 1.6)]])  # best only 75 updates old
    assert not rule.passed([[(100, 1.5), (200, 1.6), (225, 1.52)]])  # last eval within 3%


def test_paired_gaps_compare_seed_by_seed() -> None:
    """Per-seed gaps pair seed s of an arm with seed s of the reference (sync, else codistill);
    the arms' means hide that one arm is above its reference under both seeds."""
    def models(*rows: tuple[int, float]) -> list[dict]:
        return [{"seed": seed, "best_val_loss": v} for seed, v in rows]

    def arm(*rows: tuple[int, float]) -> dict:
        return {"per_group": models(*rows), "best_val_loss": 0.0, "final_val_loss": 0.0}

    # seed 2 is an easier draw for every arm: spreads larger than the gaps
    results = {"arms": {"sync": arm((1, 2.0), (2, 1.6)),
                        "codistill": arm((1, 2.1), (1, 2.1), (2, 1.64), (2, 1.68)),
                        "one-seed": arm((2, 1.5), (2, 1.7))}}
    add_gaps(results)
    arms = results["arms"]
    assert paired_ref(arms) == "sync"
    assert arms["codistill"]["best_val_loss_paired_pct"] == pytest.approx({1: 5.0, 2: 3.75})
    assert arms["one-seed"]["best_val_loss_paired_pct"] == pytest.approx({2: 0.0})
    assert arms["sync"]["best_val_loss_paired_pct"] == {1: 0.0, 2: 0.0}
    del results["arms"]["sync"]
    add_gaps(results)
    assert paired_ref(results["arms"]) == "codistill"
    assert results["arms"]["one-seed"]["best_val_loss_paired_pct"] == pytest.approx({2: (1.6 - 1.66) / 1.66 * 100})


def test_a_failing_run_stops_the_benchmark(corpus: Path, tmp_path: Path) -> None:
    proc = bench(corpus, tmp_path, "--arms", "sync", "--set", "model.num_heads=3")
    assert proc.returncode != 0
    assert "num_heads" in proc.stderr and "failed" in proc.stderr
    assert not (tmp_path / "shakespeare" / "results.json").exists()
