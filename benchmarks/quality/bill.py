"""The compute bill of an update: counted (FLOPs) and measured (CPU time), per arm.

Counted: `codistill_ds.plan.compute.update_flops` from the arm's own overrides (model sizes,
batch, groups, exchange batch, interval, alpha, weights mode): every model of the run together.
Measured: the `cpu_ms` of each update (the library's record: the CPU time of the step's
training and exchange work, every thread of every rank of a group summed), summed over the
run's models and averaged over its updates (the first WARMUP left out: allocator and first
calls), evaluation excluded. On a shared machine CPU time is what survives other jobs' load
(wall time does not); cache and memory-bandwidth contention still inflate it by a few percent,
so ratios between arms are compared side by side (`python -m benchmarks.quality.bill`).
"""

from __future__ import annotations

import json
import statistics

from codistill_ds.plan.compute import DecoderShape, update_flops

WARMUP = 5
"""Updates left out of a run's measured bill."""


def overrides(sets: list[str]) -> dict:
    """`key=JSON` overrides as a dict (the runner's own format: settings.arm_overrides)."""
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in sets)}


def shape_of(o: dict, vocab: int = 256) -> DecoderShape:
    """The decoder the overrides build (byte-level vocabulary), its parameters counted as the
    library builds them: untied embedding and lm_head, RMSNorm weights."""
    h, n, f = o["model.hidden_size"], o["model.num_layers"], o["model.intermediate_size"]
    shape = DecoderShape(0, vocab, o["data.seq_len"], h, n, f, o["model.num_heads"], None)
    params = int(shape.matmul_params()) + vocab * h + (2 * n + 1) * h
    return DecoderShape(params, vocab, o["data.seq_len"], h, n, f, o["model.num_heads"], None)


def method_of(o: dict, diloco: int) -> str:
    if diloco:
        return "diloco"
    if not o["codistill.enabled"]:
        return "sync"
    if o["codistill.mode"] == "weights":
        return "weights"
    if o["codistill.exchange_batch"] == "shared":
        return "shared"
    return "independent" if o["codistill.alpha"] == 0 else "train"


def counted(sets: list[str], diloco: int = 0, ranks: int = 2) -> dict:
    """Tokens trained and FLOPs of one update of the whole run (every model), by formula."""
    o = overrides(sets)
    shape = shape_of(o)
    method = method_of(o, diloco)
    b, L = o["data.micro_batch_size"], o["data.seq_len"]
    groups = 1 if method == "sync" else o["codistill.groups"]
    batch = b * ranks if method == "sync" else b  # sync: the global batch over its ranks
    ex = o.get("data.exchange_batch_size") or b
    flops = update_flops(shape, method, groups, batch, o["codistill.interval"], ex, o["codistill.alpha"])
    return {"method": method, "params": shape.params, "forward_flops_per_token": shape.forward_flops_per_token(),
            "tokens_per_update": groups * batch * L, "flops_per_update": flops}


def measured(records: list[dict], warmup: int = WARMUP) -> dict | None:
    """CPU seconds per update of one run, every model summed: {mean, median, updates}. None when
    the records carry no cpu_ms (runs from before the field existed)."""
    per_model: dict[int, list[float]] = {}
    for r in records:
        if r.get("cpu_ms") is not None and r["step"] > warmup:
            per_model.setdefault(r["group"], []).append(r["cpu_ms"] / 1e3)
    if not per_model:
        return None
    n = min(len(v) for v in per_model.values())
    totals = [sum(v[i] for v in per_model.values()) for i in range(n)]
    return {"cpu_s_mean": statistics.fmean(totals), "cpu_s_median": statistics.median(totals), "updates": n}
