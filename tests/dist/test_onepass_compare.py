"""The one-pass comparison regime of the quality benchmark (issue 23), tiny, end to end.

`python -m benchmarks.quality --smoke` (the session's run, tests/quality_smoke.py, which
test_quality_bench.py reads too) launches this regime's two goal arms for real (sync at 2B: 1 group x 2 ranks; codistill K=2: 2 groups x 1 rank, `exchange_batch:
train`) for one pass over 12 KB of standard-library source: the updates are what one pass
holds, each arm gets the learning rate of its own batch and the regime's common recipe, every
update records its CPU time, and the report puts both on the update, FLOPs and CPU axes.
The other arms of the regime (sync-half, independent, DiLoCo) are checked here by their
overrides; their code paths are the shakespeare smoke's (test_quality_bench.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from quality_smoke import KEY, background_launch  # noqa: F401 (the session launch)

from benchmarks.quality import corpora, onepass
from benchmarks.quality.bill import counted, overrides
from benchmarks.quality.settings import ARMS, MODES, arm_overrides, one_pass_steps

pytestmark = [pytest.mark.timeout(1800), pytest.mark.background(KEY)]

REGIME = "onepass-b4"


@pytest.fixture(scope="module")
def out(quality_smoke: Path) -> Path:
    """The session's `--smoke` run (tests/quality_smoke.py): it trains this regime too."""
    return quality_smoke


def test_one_pass_each_arm_at_its_own_learning_rate(out: Path) -> None:
    mode = MODES["smoke"]
    regime = mode.regimes[REGIME]
    res = json.loads((out / REGIME / "results.json").read_text())
    train, _ = corpora.split_windows(arm_overrides(ARMS["sync"], mode, one_pass_steps(regime, mode, 1), 0, []))
    steps = train // (2 * 4)
    assert res["regime"]["steps"] == steps > 10  # one pass of sync at 2B = 8 sequences
    lr = dict(regime.lr)
    for arm, batch, ranks in (("sync", 8, 2), ("codistill", 4, 1)):
        run = out / REGIME / "runs" / f"{arm}-s1234"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == lr[batch] and cfg["optim"]["schedule"] == "constant"
        assert cfg["optim"]["weight_decay"] == 0.1 and cfg["train"]["steps"] == steps
        assert cfg["data"]["micro_batch_size"] * ranks == batch
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for g in range(3 - ranks):
            mine = [r for r in records if r["group"] == g]
            assert [r["step"] for r in mine] == list(range(1, steps + 1))
            assert all(r["cpu_ms"] > 0 for r in mine)
        assert steps * batch * (3 - ranks) <= train  # no window read twice
    assert res["arms"]["codistill"]["val_curve"][-1][0] == steps


def test_the_bill_and_the_compute_axes(out: Path) -> None:
    res = json.loads((out / REGIME / "results.json").read_text())
    sync, codi = res["arms"]["sync"]["bill"], res["arms"]["codistill"]["bill"]
    assert sync["tokens_per_update"] == codi["tokens_per_update"] == 8 * 32
    assert codi["flops_per_update"] / sync["flops_per_update"] == pytest.approx(4 / 3)
    assert sync["cpu_s_per_update"] > 0 and codi["cpu_s_per_update"] > 0
    s = res["onepass"]["codistill"]
    assert set(s["final_gap_vs_sync_by_seed_pct"]) == {"1234"}
    assert s["flops"]["per_update_vs_sync"] == pytest.approx(4 / 3)
    assert math.isfinite(s["flops"]["1234"]["gap_at_sync_budget_pct"])
    assert res["onepass"]["sync"]["flops"]["mean"]["gap_at_sync_budget_pct"] == pytest.approx(0.0, abs=1e-9)
    table = (out / REGIME / "results.md").read_text()
    assert "Equal updates, equal tokens and the compute bill" in table and "on the FLOPs axis" in table
    png = (out / "onepass.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_the_other_arms_overrides() -> None:
    """sync-half: the same 2 ranks at half the batch and the same updates (its lr is batch 4's);
    independent: alpha 0 with a sparse exchange; DiLoCo: 2 workers at B; the counted FLOPs."""
    mode = MODES["quick"]
    regime = one_pass_steps(mode.regimes["onepass-b64"], mode, 93_848)
    assert regime.steps == 733
    o = {a: overrides(arm_overrides(ARMS[a], mode, regime, 1234, [])) for a in
         ("sync", "sync-half", "codistill", "independent", "diloco-h10")}
    lr = dict(regime.lr)
    assert o["sync"]["data.micro_batch_size"] == 64 and o["sync"]["optim.lr"] == lr[128]
    assert o["sync-half"]["data.micro_batch_size"] == 32 and o["sync-half"]["optim.lr"] == lr[64]
    assert o["codistill"]["optim.lr"] == o["independent"]["optim.lr"] == o["diloco-h10"]["optim.lr"] == lr[64]
    assert all(v["train.steps"] == 733 and v["optim.weight_decay"] == 0.1 for v in o.values())
    assert o["independent"]["codistill.alpha"] == 0 and o["independent"]["codistill.interval"] == 50
    assert o["codistill"]["codistill.exchange_batch"] == "train"
    flops = {a: counted(arm_overrides(ARMS[a], mode, regime, 1234, []), ARMS[a].diloco)["flops_per_update"]
             for a in o}
    assert flops["sync-half"] / flops["sync"] == pytest.approx(0.5)
    assert flops["diloco-h10"] == pytest.approx(flops["sync"])
    assert flops["independent"] / flops["sync"] == pytest.approx(1 + 1 / 150)


def test_compute_axis_by_hand() -> None:
    """An arm at 4/3 of sync's FLOPs per update: at sync's whole budget (100 updates) it has
    taken 75, where its curve (linear here) is read; sync's final loss it reaches at update 90."""
    def arm(curve, flops):
        return {"per_group": [{"seed": 1, "val_history": curve}], "val_curve": curve,
                "bill": {"flops_per_update": flops, "cpu_s_per_update": None}}

    sync = arm([[50, 2.0], [100, 1.5]], 3.0)
    codi = arm([[50, 2.2], [100, 1.3]], 4.0)
    axis = onepass.compute_axis(codi, sync, "flops")
    assert axis["per_update_vs_sync"] == pytest.approx(4 / 3)
    at = 2.2 + (1.3 - 2.2) * (75 - 50) / 50  # 1.75
    assert axis["1"]["loss_at_sync_budget"] == pytest.approx(at)
    assert axis["1"]["gap_at_sync_budget_pct"] == pytest.approx((at / 1.5 - 1) * 100)
    reach = 50 + 50 * (2.2 - 1.5) / (2.2 - 1.3)  # update 88.9
    assert axis["1"]["compute_to_sync_loss_vs_sync"] == pytest.approx(reach * 4 / 300)
    assert onepass.compute_axis(codi, sync, "cpu") == {}
