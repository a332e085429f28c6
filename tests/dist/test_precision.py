"""`backend.precision: bf16` end to end on CPU, through the CLI's `run` on 4 ranks (2 groups x 2).

One launch (tests/workers/ckpt_run.py, which calls `codistill_ds.run.job.run` as `codistill-ds
train` does) trains ZeRO-3 then FSDP2 on the same ranks; each run builds its own process groups
and replica from the config's seed and writes its own summary.json and metrics.jsonl.

DeepSpeed ZeRO-3 runs bf16 parameters with fp32 master weights (the `bf16` section); FSDP2 keeps
fp32 sharded parameters and computes in bf16 (MixedPrecisionPolicy). Both build the replica from
the same seed (materialize.py) and round it to bf16 once, so their first step sees the same
bf16 weights. Losses and the exchange stay fp32 / the wire dtype whatever the compute dtype."""

from __future__ import annotations

import json
import math

import pytest
from multirun import run_worker_runs

from launch import REPO, read_jsonl

pytestmark = pytest.mark.timeout(600)
STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    backends = ("deepspeed", "fsdp")
    sets = [str(REPO / "tests" / "tiny_test.yaml"), "backend.precision=bf16", f"train.steps={STEPS}",
            f"train.eval_interval={STEPS}", "codistill.alpha=1", "codistill.dtype=fp16"]
    run_worker_runs("ckpt_run", 4, out, sets, {b: [f"backend.name={b}", f"run_dir={out / b / 'run'}"] for b in backends},
                    timeout=540)
    return {b: {"summary": json.loads((out / b / "run" / "summary.json").read_text()),
                "metrics": read_jsonl(out / b / "run" / "metrics.jsonl")} for b in backends}


def test_bf16_runs_end_to_end_on_cpu(runs):
    for backend, r in runs.items():
        s = r["summary"]
        assert s["compute_dtype"] == "torch.bfloat16", (backend, s["compute_dtype"])
        for g in range(2):
            losses = [m["loss"] for m in r["metrics"] if m["group"] == g]
            assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), (backend, losses)
            assert losses[-1] < losses[0] - 0.3, (backend, g, losses)
            assert s["per_group"][g]["peak_memory_bytes"] > 0
        distill = [m["distill_loss"] for m in r["metrics"] if m["step"] > 1]
        assert all(d is not None and math.isfinite(d) and d >= 0 for d in distill), distill


def test_both_backends_start_from_the_same_bf16_weights(runs):
    """Step 1 (before any update) of ZeRO-3 bf16 and FSDP2 bf16: same rounded weights, same data."""
    first = {b: {m["group"]: m["loss"] for m in r["metrics"] if m["step"] == 1} for b, r in runs.items()}
    for g in range(2):
        assert abs(first["deepspeed"][g] - first["fsdp"][g]) < 1e-3, first
