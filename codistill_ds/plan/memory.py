"""Memory per rank of one codistillation group, on paper (`codistill-ds plan --micro-batch ...`).

Estimates, for sizing a cluster before renting it; measured figures belong in benchmarks/.
Symbols as in plan.py, plus h hidden size, n layers, b micro batch, L sequence length.

    model states  = 16 P / S   bf16 compute with fp32 master weights and AdamW, sharded over the
                               group (Rajbhandari et al. 2020, "ZeRO", mixed-precision Adam):
                               ZeRO-3: 2 (bf16 params) + 2 (bf16 grads) + 4 + 4 + 4 (fp32 master,
                               m, v); FSDP2: 4 (fp32 sharded params) + 4 (fp32 grads) + 4 + 4
    gathered      = 2 * 2 P / n  bf16 parameters of the block in use and of the one prefetched
    activations   = 34 h b L n   bytes kept for backward per micro-batch without activation
                               checkpointing, flash/SDPA attention (Korthikanti et al. 2022,
                               eq. 2 without the attention-score term), plus the logits:
                  + 10 b L V     bf16 logits, their fp32 copy for the loss and its gradient
    build peak    = 4 P / S + largest module   materialize.py: fp32 partitions while building
"""

from __future__ import annotations

from dataclasses import dataclass

STATE_BYTES_PER_PARAM = 16
ACTIVATION_BYTES_PER_HIDDEN = 34
LOGIT_BYTES = 10


@dataclass
class MemoryPlan:
    model_state_bytes: float
    """16 P / S: parameters, gradients, fp32 master weights and AdamW moments of my shard."""
    gathered_bytes: float
    """bf16 copies of the block being computed and of the next one (ZeRO-3/FSDP2 prefetch)."""
    activation_bytes: float
    """One micro-batch's activations kept for backward, logits included."""
    build_peak_bytes: float
    """Building the replica partitioned (materialize.py): fp32 shards plus the largest module."""
    tokens_per_step: int
    """Training tokens per optimizer step, all groups together (micro batch x W x L)."""

    @property
    def total_bytes(self) -> float:
        return self.model_state_bytes + self.gathered_bytes + self.activation_bytes


def memory_plan(params: int, world: int, groups: int, micro_batch: int, seq_len: int, hidden: int,
                layers: int, vocab: int, grad_accum: int = 1) -> MemoryPlan:
    """Per-rank memory of training one replica sharded over S = world / groups ranks."""
    for name, value in (("micro_batch", micro_batch), ("hidden", hidden), ("layers", layers),
                        ("grad_accum", grad_accum)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0 for the memory estimate, got {value}")
    s = world // groups
    largest = max(vocab * hidden, params / layers)
    tokens = micro_batch * seq_len
    return MemoryPlan(
        model_state_bytes=STATE_BYTES_PER_PARAM * params / s,
        gathered_bytes=2 * 2 * params / layers,
        activation_bytes=ACTIVATION_BYTES_PER_HIDDEN * hidden * tokens * layers + LOGIT_BYTES * tokens * vocab,
        build_peak_bytes=4 * params / s + 4 * largest,
        tokens_per_step=tokens * world * grad_accum,
    )


def format_memory(m: MemoryPlan, exchange_bytes_per_step: float, human) -> list[str]:
    """Lines appended to the plan table (`human` formats bytes)."""
    rows = [
        ("model states per rank (16 P / S)", m.model_state_bytes),
        ("gathered bf16 blocks per rank", m.gathered_bytes),
        ("activations per rank (one micro-batch)", m.activation_bytes),
        ("estimated total per rank", m.total_bytes),
        ("peak while building (materialize.py)", m.build_peak_bytes),
    ]
    width = max(len(name) for name, _ in rows)
    per_token = exchange_bytes_per_step / m.tokens_per_step
    head = "memory per rank (estimate: bf16 compute, fp32 master weights, AdamW, no activation checkpointing):"
    tail = (f"  training tokens per step (all groups): {m.tokens_per_step:,}; cross-group bytes per "
            f"training token: {per_token:.3f}")
    return ["", head, *(f"  {name:<{width}}  {human(value):>12}" for name, value in rows), tail]
