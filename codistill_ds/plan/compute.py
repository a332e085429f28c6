"""Compute of an update on paper: FLOPs per token of a decoder, and what each method spends.

Symbols as in bytes.py and memory.py: P parameters, h hidden size, n layers, f MLP width, V
vocabulary, L sequence length, K groups, B sequences per group per optimizer step.

    F = 2 P_mm + 2 n L h        forward FLOPs per token (Kaplan et al. 2020, arXiv 2001.08361,
                                table 1): 2 per weight of every matrix multiply, P_mm = the
                                layers' q/k/v/o, gate/up/down matrices and the lm_head (the
                                embedding lookup is free), plus causal attention, QK^T and AV
                                over L/2 positions on average. Without sizes: P_mm = P, no
                                attention term.
    training         3 F per token (forward, and a backward of twice the forward)
    teacher forward  F per token predicted (no backward; eval mode)

Per optimizer step, all K groups together (what the user pays):
    sync at K B            3 F K B L
    codistill, train batch K (3 F B L + (K - 1) F f B L / I)    each group predicts on its
                           K - 1 peers' batches every I-th step (Anil et al.'s setting), on the
                           first f B sequences of each under token_fraction f
    codistill, shared      K (3 F B L + (F E L + 3 F E L a) / I)   teacher and student forwards
                           on the E-sequence exchange batch (the student only when alpha > 0)
    codistill, weights     K (3 F B L + (K - 1) F B L)      the frozen peer copies predict on
                           my batch every step, whatever the interval
    DiLoCo (K workers)     3 F K B L                        (the outer step is O(P), not O(P L B))

The distillation loss itself (a softmax over k + 1 entries per position) and the optimizer are
O(P + B L k), not counted. benchmarks/quality/bill.py measures these bills (CPU time per update)
against the counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """What the FLOPs of a Llama-style decoder depend on (None hidden: only P is known)."""

    params: int
    vocab: int
    seq_len: int
    hidden: int | None = None
    layers: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None

    def matmul_params(self) -> float:
        """Weights that take part in a matrix multiply per token (all of P without sizes)."""
        if not (self.hidden and self.layers):
            return float(self.params)
        h, n = self.hidden, self.layers
        f = self.intermediate or 4 * h
        kv = h if not (self.heads and self.kv_heads) else h * self.kv_heads // self.heads
        return float(n * (2 * h * h + 2 * h * kv + 3 * h * f) + h * self.vocab)

    def forward_flops_per_token(self) -> float:
        attention = 2.0 * self.layers * self.seq_len * self.hidden if self.hidden and self.layers else 0.0
        return 2.0 * self.matmul_params() + attention


def update_flops(shape: DecoderShape, method: str, groups: int, batch: int, interval: int = 1,
                 exchange_batch: int = 0, alpha: float = 1.0, fraction: float = 1.0) -> float:
    """FLOPs of one optimizer step of every group together; `batch` is B, sequences per group
    (sync: the global batch is K B). method: sync | diloco | train | shared | weights |
    independent (a train-batch exchange at alpha 0: the teacher forward only where it runs).
    `fraction`: token_fraction (train batch: the sequences predicted on; shared: positions only,
    the teacher still runs on whole sequences)."""
    f, L, k = shape.forward_flops_per_token(), shape.seq_len, groups
    train = 3.0 * f * batch * L
    if method in ("sync", "diloco"):
        return k * train
    if method in ("train", "independent"):
        rows = max(1, math.ceil(fraction * batch - 1e-9))
        return k * (train + (k - 1) * f * rows * L / interval)
    if method == "shared":
        return k * (train + (f + 3.0 * f * (alpha > 0)) * exchange_batch * L / interval)
    if method == "weights":
        return k * (train + (k - 1) * f * batch * L)
    raise ValueError(f"unknown method {method!r}")


# ---- `codistill-ds plan --link-gbps ... --noise-scale ...`: predicted step times ------------------

RULE = ("Measured rule (benchmarks/RESULTS.md, 'Critical batch and the one-pass regime'; a 295k-parameter "
        "byte-level Llama, one pass over 12M tokens, per-group batch 128 = 1x-6x its critical batch, learning "
        "rates tuned per batch): codistill K=2 ended 8.4% above sync at 2B at equal updates, and above two "
        "models trained with no exchange (alpha 0.1-0.5: level with them); it pays only where the comm line "
        "dominates sync's step.")
"""The benchmark's rule, quoted under every step-time table (kept in step with RESULTS.md)."""


@dataclass
class StepTimes:
    """Predicted seconds per optimizer step of each method at one layout (see `step_times`)."""

    forward_flops_per_token: float
    """F of the decoder (`DecoderShape`)."""
    rank_flops_per_s: float
    """What one rank achieves: peak x MFU."""
    link_bytes_per_s: float
    """The slow link leaving one node (one group per node), each direction."""
    exchange_batch: str
    methods: dict
    """method -> {flops_per_rank, compute_s, bytes_per_step, comm_s, step_s} for sync (one job of
    K B sequences over all W ranks; the cheaper of ring and hierarchical all-reduce), DiLoCo (K
    workers of S ranks at B, fp32 pseudo-gradients every H steps) and codistill (K groups at B)."""
    group_batch_tokens: int
    """B L: one group's (or one DiLoCo worker's) tokens per step."""
    noise_scale_tokens: float | None = None
    """B_noise (McCandlish et al. 2018), given or measured (`python -m benchmarks.onepass`)."""
    past_critical: bool | None = None
    """B L >= B_noise: the per-group batch is at or past the critical batch."""
    sync_update_worth: float | None = None
    """(1 + B_noise / B) / (1 + B_noise / (K B)): what one update of sync at K B is worth in
    updates of one group at B (McCandlish's S(B) = S_min (1 + B_noise / B)): K far below the
    critical batch, 1 far past it. Codistillation must make up this factor through its peers."""
    rule: str = RULE


def step_times(plan, shape: DecoderShape, link_gbps: float, device_tflops: float, mfu: float,
               exchange_batch: str = "train", alpha: float = 1.0, token_fraction: float = 1.0,
               noise_scale_tokens: float | None = None) -> StepTimes:
    """Compute from FLOPs (per rank: the method's FLOPs per step / S / (peak x MFU)),
    communication from the plan's bytes leaving one node per step / the link's bandwidth, step =
    compute + communication (no overlap: an asynchronous exchange, Streaming DiLoCo or a
    bucketed all-reduce can hide part of the second term)."""
    if link_gbps <= 0 or device_tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"need link_gbps > 0, device_tflops > 0 and 0 < mfu <= 1, got {link_gbps}, "
                         f"{device_tflops}, {mfu}")
    if exchange_batch not in ("train", "shared"):
        raise ValueError(f"exchange_batch must be 'train' or 'shared', got {exchange_batch!r}")
    k, s, L = plan.groups, plan.ranks_per_group, plan.seq_len
    b = plan.train_tokens_per_group_per_step // L
    rate, link = device_tflops * 1e12 * mfu, link_gbps * 1e9 / 8
    if exchange_batch == "train":
        per_group = update_flops(shape, "train", k, b, plan.interval, alpha=alpha, fraction=token_fraction) / k
    else:
        per_group = update_flops(shape, "shared", k, b, plan.interval, plan.batch, alpha) / k
    sync_bytes = min(plan.boundary["ring"], plan.boundary["hierarchical"])
    rows = {"sync": (3.0 * shape.forward_flops_per_token() * b * L, sync_bytes),
            "diloco": (3.0 * shape.forward_flops_per_token() * b * L, plan.boundary["diloco_fp32"]),
            "codistill": (per_group, plan.boundary["codistill"])}
    methods = {}
    for name, (flops, nbytes) in rows.items():
        compute, comm = flops / s / rate, nbytes / link
        methods[name] = {"flops_per_rank": flops / s, "compute_s": compute, "bytes_per_step": nbytes,
                         "comm_s": comm, "step_s": compute + comm}
    out = StepTimes(shape.forward_flops_per_token(), rate, link, exchange_batch, methods, b * L)
    if noise_scale_tokens is not None:
        if noise_scale_tokens <= 0:
            raise ValueError(f"noise scale must be > 0 tokens, got {noise_scale_tokens}")
        bn, bt = noise_scale_tokens, b * L
        out.noise_scale_tokens = float(bn)
        out.past_critical = bt >= bn
        out.sync_update_worth = (1 + bn / bt) / (1 + bn / (k * bt))
    return out


def _rel(st: StepTimes, method: str, updates: float) -> str:
    """The method's time to a loss over sync's, when it needs `updates` x sync's updates."""
    return f"{updates * st.methods[method]['step_s'] / st.methods['sync']['step_s']:.3f}x"


def format_step_times(st: StepTimes, groups: int, diloco_h: int) -> list[str]:
    from codistill_ds.plan.units import human_bytes

    head = (f"predicted step time (compute = FLOPs / (rank peak x MFU) = {st.rank_flops_per_s / 1e12:,.1f} "
            f"TFLOP/s achieved per rank; communication = bytes leaving one node / "
            f"{st.link_bytes_per_s * 8 / 1e9:,.2f} Gbit/s; no overlap):")
    lines = ["", head, f"  forward FLOPs per token F = {st.forward_flops_per_token:,.4g}; training 3F, teacher forward F",
             f"  {'method':<42} {'compute':>11} {'comm':>11} {'step':>11} {'bytes/step/node':>16}"]
    names = {"sync": f"sync, one job at global batch {groups} x B",
             "diloco": f"DiLoCo, {groups} workers at B, H={diloco_h}",
             "codistill": f"codistill, {groups} groups at B ({st.exchange_batch} batch)"}
    for key, label in names.items():
        m = st.methods[key]
        lines.append(f"  {label:<42} {m['compute_s'] * 1e3:>9.1f}ms {m['comm_s'] * 1e3:>9.1f}ms "
                     f"{m['step_s'] * 1e3:>9.1f}ms {human_bytes(m['bytes_per_step']):>16}")
    if st.noise_scale_tokens is not None:
        ratio = st.group_batch_tokens / st.noise_scale_tokens
        where = "at or past" if st.past_critical else "below"
        lines.append(f"  per-group batch B = {st.group_batch_tokens:,} tokens = {ratio:.2f} x the noise scale "
                     f"{st.noise_scale_tokens:,.0f} tokens: {where} the critical batch")
        lines.append(f"  one update of sync at {groups} B is worth {st.sync_update_worth:.3f} updates of one group at B "
                     f"(McCandlish: {groups:.0f} far below the critical batch, 1 far past it)")
        lines.append(f"  time to a loss, in sync's: codistill {_rel(st, 'codistill', 1.0)} (as good as sync per update) "
                     f"to {_rel(st, 'codistill', st.sync_update_worth)} (nothing learned from its peers; the benchmark did worse at alpha 1); "
                     f"DiLoCo {_rel(st, 'diloco', 1.0)} at sync's quality per update")
    lines.append(f"  {st.rule}")
    return lines
