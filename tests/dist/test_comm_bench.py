"""End to end: `python -m benchmarks.comm --smoke` measures cross-group bytes through real training.

The smoke setting of part (a) (2 ranks = 2 groups x 1, a 37k-parameter Llama, 4 steps) runs the
product's training function under torchrun and checks that the bytes the library counts equal
`plan.make_plan`'s formula exactly (per rank and in total, top-k and full vocabulary), that an
independent count at the `torch.distributed` boundary agrees, and that the synchronous baseline's
measured gradient all-reduce matches 2(W-1)/W x P x 4. The two-node part runs only where
`ip netns` works (root, iproute2); it is a few steps over a capped veth link.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.comm.netns import netns_available
from codistill_ds.distributed.launching import REPO


def bench(out: Path, *extra: str, timeout: float) -> dict:
    """Run the benchmark; past `timeout`, SIGTERM it so it stops its jobs and removes its
    namespaces (a SIGKILL, subprocess.run's way, would leave both behind)."""
    cmd = [sys.executable, "-m", "benchmarks.comm", "--out", str(out), "--smoke", *extra]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"benchmark ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"benchmark failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(180)
def test_smoke_bytes_equal_plan(tmp_path: Path) -> None:
    from codistill_ds.plan.bytes import make_plan

    results = bench(tmp_path, timeout=100)
    b = results["bytes"]
    rows = {r["name"]: r for r in b["codistill"]}
    assert set(rows) == {"leaders-top8", "leaders-full", "leaders-top1-fp8"}
    for r in rows.values():
        plan = make_plan(params=r["params"], vocab=256, seq_len=r["seq_len"], batch=r["exchange_batch"],
                         topk=r["topk"], interval=r["interval"], groups=2, world=2, dtype=r["dtype"])
        assert r["measured_bytes_per_step"] == plan.exchange_bytes_per_step
        assert r["measured_total_bytes"] == plan.exchange_bytes_per_exchange * r["exchanges"]
        assert r["measured_bytes_per_rank"] == [plan.leader_bytes_per_exchange * r["exchanges"]] * 2
        assert r["measured_boundary_bytes_per_step"] == plan.boundary["codistill"]
        assert r["metrics_jsonl_cumulative_per_group"] == r["measured_bytes_per_rank"]
        assert r["equal_to_plan"] and r["instrument_agrees"]
    # 2 seqs x 32 tokens per group. full vocabulary: 2-byte values, no ids; top-8: 2-byte values
    # + uint16 ids (vocab 256); top-1 fp8: 1-byte value + uint16 id + 1 scale byte.
    assert rows["leaders-full"]["plan_payload_per_group"] == 2 * 32 * 256 * 2
    assert rows["leaders-top8"]["plan_payload_per_group"] == 2 * 32 * 8 * (2 + 2)
    assert rows["leaders-top1-fp8"]["plan_payload_per_group"] == 2 * 32 * (1 + 2 + 1)
    assert b["all_equal_to_plan"]

    s = b["sync"]
    assert s["cross_group_bytes"] == 0
    formula = s["formula_allreduce_bytes_per_rank_per_step"]
    assert formula == 2 * (2 - 1) / 2 * s["params"] * 4
    # the gradient all-reduce, plus a few scalars (overflow/norm checks) of a few bytes each
    assert formula <= s["measured_allreduce_bytes_per_rank_per_step"] <= formula * 1.001
    assert s["measured_zero_bytes_per_rank_per_step"] >= s["measured_allreduce_bytes_per_rank_per_step"]
    # like for like (one rank per node here): a ring rank's share against one group's exchange
    assert b["tiny_ratio"]["measured_allreduce_over_exchange"] == pytest.approx(
        b["tiny_ratio"]["plan_ratio_fp32_grads"], rel=1e-3)

    # docs/design.md's goal at 1B: <= 1/10 of Streaming DiLoCo's 44.2 B per training token
    assert b["plan_1b"]["params"] == 10**9 and b["goal_bytes_per_token"] == pytest.approx(4.42)
    assert b["plan_1b"]["per_token"]["codistill"] == 128.0 and not b["plan_1b_goal_met"]
    assert b["plan_1b_compact"]["per_token"]["codistill"] == 4.0 and b["plan_1b_compact_goal_met"]
    # Weight exchange validates for the benchmark's ZeRO-3 setting (the check `in (True, False)`
    # could not fail, issue 24). The smoke setting does not run the weights arm; its measured
    # bytes against `plan`'s formula are asserted in tests/dist/test_weights_mode.py.
    assert b["weights_mode"]["validates"] is True and not b["weights_mode"]["skipped"], b["weights_mode"]
    assert b["weights"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| leaders-top8 |" in md and "1B parameters" in md


@pytest.mark.timeout(180)
@pytest.mark.skipif(not netns_available()[0], reason="ip netns / veth / tc not usable here (needs root)")
def test_smoke_two_nodes(tmp_path: Path) -> None:
    """1 rank per node: sync is 1 group over both nodes, codistill 2 groups x 1 rank."""
    results = bench(tmp_path, "--parts", "twonode", timeout=100)
    c = results["twonode"]
    sync, codi = c["arms"]["sync-100mbit"], c["arms"]["codistill-100mbit"]
    assert sync["groups"] == 1 and codi["groups"] == 2
    # only the exchange crosses the link in codistillation: far less than ZeRO's all-reduce
    assert codi["link"]["node0_tx_bytes"] * 3 < sync["link"]["node0_tx_bytes"]
    assert codi["cross_group_bytes"] > 0 and sync["cross_group_bytes"] == 0
    assert (tmp_path / "comm_twonode.png").read_bytes().startswith(b"\x89PNG")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split()
    assert c["link"]["namespaces"] and not set(c["link"]["namespaces"]) & set(left)  # removed
