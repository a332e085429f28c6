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
