"""Tensor parallelism inside a group, end to end through the real CLI (docs/design.md, "Axes").

Three runs in two launches share the checks:
  A  K=2 groups x T=1 (2 ranks, FSDP2), route rails, fp32 wire, staleness 0, alpha 1: the reference;
  B  K=2 groups x T=2 (4 ranks, FSDP2 + DTensor TP, vocabulary-sliced exchange), the same config,
     checkpoints at steps 4 and 8;
  C  B again, rank 2 SIGKILLed at step index 6: the restart resumes from step_4 by itself.
B and C are one launch under `torchrun --max-restarts 1` (tests/workers/ckpt_run_then_killed.py):
the first attempt runs B to its end, then C until the kill; the restarted ranks run C alone.
Checked: B's per-step losses and distillation losses equal A's to 1e-5 and each group's
cross-group bytes are A's exactly (each TP rank sends a distinct half of the rows); C ends where B
ends (the same losses, the same full weights); exporting B's groups (`codistill-ds export`, both
groups in one process) gives `from_pretrained` folders with the trained logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from ckpt_runs import CONFIG, by_group_step, results

from launch import REPO, WORKERS, child_env, cli, torchrun

pytestmark = pytest.mark.timeout(1500)
STEPS = 8
SETS = ["backend.name=fsdp", "codistill.route=rails", "codistill.dtype=fp32", "codistill.alpha=1", "codistill.staleness=0",
        f"train.steps={STEPS}", "train.eval_interval=4", "train.save_interval=4"]


@cache
def reference(tmp: Path) -> Path:
    run = tmp / "t1"
    proc = cli(2, "train", "--config", CONFIG, "--run-dir", str(run), "--set", *SETS, "parallel.tp=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """B and C in one launch (tests/workers/ckpt_run_then_killed.py: B, then C in the same
    processes until C's fault; the restart runs C alone), then A."""
    tmp = tmp_path_factory.mktemp("tp_cli")
    b, c = tmp / "b", tmp / "c"
    proc = torchrun(4, ["--max-restarts", "1", str(WORKERS / "ckpt_run_then_killed.py"), str(b), str(c), CONFIG,
                        *SETS, "parallel.tp=2"], timeout=1000, FAULT="kill:2:6")
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"a": reference(tmp), "b": b, "c": c}


def test_tp2_trains_what_tp1_trains(runs):
    a, b = by_group_step(runs["a"]), by_group_step(runs["b"] / "run")
    assert a.keys() == b.keys() and len(a) == 2 * STEPS
    worst = 0.0
    for key, rec in a.items():
        got = b[key]
        for field in ("loss", "distill_loss", "val_loss"):
            if rec.get(field) is not None:
                worst = max(worst, abs(got[field] - rec[field]))
                assert abs(got[field] - rec[field]) <= 1e-5, (key, field, got[field], rec[field])
    print(f"T=2 vs T=1: max |loss difference| over {len(a)} records = {worst:.2e}")
    one = json.loads((runs["a"] / "summary.json").read_text())["per_group"]
    two = json.loads((runs["b"] / "run" / "summary.json").read_text())["per_group"]
    for x, y in zip(one, two):
        assert y["cross_group_bytes"] == x["cross_group_bytes"] > 0, (x, y)
        assert len(y["cross_group_bytes_per_rank"]) == 2
        assert y["cross_group_bytes_per_rank"] == [x["cross_group_bytes"] // 2] * 2  # each TP rank: half the rows
    # the groups trained different models
    assert abs(b[(0, STEPS)]["loss"] - b[(1, STEPS)]["loss"]) > 1e-3


def test_killed_tp_run_resumes_where_the_uninterrupted_run_ends(runs):
    ref, got = by_group_step(runs["b"] / "run"), by_group_step(runs["c"] / "run")
    assert ref.keys() == got.keys()
    for key, rec in ref.items():
        for field in ("loss", "distill_loss", "val_loss", "agreement"):
            assert got[key].get(field) == rec.get(field), (key, field)
    restarted = results(runs["c"])
    assert all(r["restarts"] == 1 and r["start_step"] == 4 for r in restarted), restarted
    assert [r["weights"] for r in restarted] == [r["weights"] for r in results(runs["b"])]


EXPORT_BOTH = ("import json, sys\nfrom codistill_ds.cli import main\n"
               "sys.exit(max(main(argv) for argv in json.loads(sys.argv[1])))")
"""`codistill-ds export` for each argv in turn, in one process (`python -m codistill_ds.cli` runs
this `main`): one interpreter start (torch, transformers) instead of one per group."""


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("tp_cli_export")
    outs = {g: tmp / f"hf{g}" for g in (0, 1)}
    argvs = [["export", str(runs["b"] / "run"), "--group", str(g), str(out)] for g, out in outs.items()]
    proc = subprocess.run([sys.executable, "-c", EXPORT_BOTH, json.dumps(argvs)], cwd=REPO, env=child_env(),
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outs


@pytest.mark.parametrize("group", [0, 1])
def test_export_of_a_tp_group_loads_with_from_pretrained(runs, exported, group):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported[group]).eval()
    trained = torch.load(runs["b"] / f"logits_group{group}.pt")
    with torch.no_grad():
        logits = model(input_ids=trained["tokens"][:, :-1]).logits
    diff = (logits - trained["logits"]).abs().max().item()
    print(f"T=2 group {group}: max |exported - trained| logit = {diff:.3g}")
    assert diff <= 1e-5
