"""Memory per rank of one codistillation group, on paper (`codistill-ds plan --micro-batch ...`).

Estimates, for sizing a cluster before renting it; measured figures belong in benchmarks/.
Symbols as in plan.py, plus h hidden size, n layers, b micro batch (sequences per data rank),
L sequence length, V vocabulary; a group of S ranks is R replicas x D shards x T tensor-parallel
ranks (docs/design.md, "Axes"), A = R D data ranks.

    P_t           = (P - (2n + 1) h) / T + (2n + 1) h   parameters one TP rank holds: every
                               matrix (q/k/v/o, gate/up/down, embedding, lm_head) split T ways,
                               the RMSNorm weights whole (tensor_parallel.py); P_t = P when T = 1
    model states  = 16 P_t / D   bf16 compute with fp32 master weights and AdamW, fully sharded
                               (ZeRO-3 / FSDP2; HSDP keeps R copies, so D and not R D divides):
                               ZeRO-3: 2 (bf16 params) + 2 (bf16 grads) + 4 + 4 + 4 (fp32 master,
                               m, v); FSDP2: 4 (fp32 sharded params) + 4 (fp32 grads) + 4 + 4
                               (Rajbhandari et al. 2020, "ZeRO", mixed-precision Adam). With
                               T = R = 1 this is 16 P / S.
                  = 4 P_t + 12 P_t / A     ZeRO-1 (+ AutoTP): bf16 params and grads whole per TP
                               rank, the 12 bytes of optimizer state sharded over the A data ranks
                  = 2 P_t + 14 P_t / A     ZeRO-2: the gradients sharded too (ZeRO paper, Fig. 1)
    gathered      = 2 * 2 P_t / n  bf16 parameters of the block in use and of the one prefetched
                               (ZeRO-3 / FSDP2 only; ZeRO-1/2 hold them in the model states)
    activations   per layer, bytes kept for backward, flash/SDPA attention (Korthikanti et al.
                  2022, "Reducing Activation Recomputation in Large Transformer Models",
                  arXiv 2205.05198, eq. 2 and 3 without the 5 a L^2 b attention-score term):
                  a_layer = L b h (10 + 24 / T)   tensor parallelism without sequence
                               parallelism: the layer input, the two norm inputs and the dropout
                               masks (10 L b h) are whole on every TP rank, the rest split;
                               34 L b h when T = 1. A checkpointed layer keeps its input only,
                               2 L b h, and one layer's a_layer is rebuilt during its backward:
                  none        n a_layer
                  full        n 2 L b h + a_layer
                  selective   (n - c) a_layer + c 2 L b h + a_layer, c = floor(n / 2) (every
                              second layer, activation_checkpointing.py)
                  + 10 b L V / T   bf16 logits, their fp32 copy for the loss and its gradient, on
                               V / T vocabulary columns
    build peak    = 4 P_t / D + 4 max(V h, P / n)   materialize.py / replica.py: fp32 shards plus
                               the largest module; ZeRO-1/2 build the whole replica: 4 P

What is counted: Korthikanti's block is GPT's (4h GeLU MLP, dropout masks); Llama's SwiGLU MLP
(intermediate ~3.5h, no dropout) and Hugging Face's fp32 RMSNorm upcasts keep a different mix,
not modelled. Under DeepSpeed AutoTP the logits are gathered whole (10 b L V, not / T): the
activation lines assume torch's TP styles (backend fsdp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STATE_BYTES_PER_PARAM = 16
ACTIVATION_BYTES_PER_HIDDEN = 34
ACTIVATION_REPLICATED = 10
"""Korthikanti et al.'s bytes per L b h kept whole on every TP rank (no sequence parallelism)."""
ACTIVATION_SPLIT = 24
"""... and split over the T ranks: 10 + 24 = 34 when T = 1."""
CHECKPOINT_INPUT = 2
"""Bytes per L b h a checkpointed layer keeps: its bf16 input."""
LOGIT_BYTES = 10
AC_MODES = ("none", "full", "selective")
ZERO_STAGES = (1, 2, 3)


def tp_params(params: float, hidden: int, layers: int, tp: int) -> float:
    """P_t: the parameters one TP rank holds (the RMSNorm weights, (2n + 1) h, are whole on
    every TP rank; everything else is split T ways). P itself when T = 1."""
    if tp == 1:
        return params
    whole = (2 * layers + 1) * hidden
    return (params - whole) / tp + whole


def checkpointed_layers(mode: str, layers: int) -> int:
    """How many of n layers `activation_checkpointing.py` wraps: all, every second, none."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(AC_MODES)}, got {mode!r}")
    return {"none": 0, "full": layers, "selective": layers // 2}[mode]


def activation_bytes(mode: str, micro_batch: int, seq_len: int, hidden: int, layers: int,
                     vocab: int, tp: int = 1) -> float:
    """One micro-batch's activations kept for backward on one GPU (module docstring)."""
    sbh = micro_batch * seq_len * hidden
    per_layer = ACTIVATION_REPLICATED * sbh + ACTIVATION_SPLIT * sbh / tp
    if tp == 1:
        per_layer = ACTIVATION_BYTES_PER_HIDDEN * sbh  # the same number, kept an integer
    c = checkpointed_layers(mode, layers)
    kept = (layers - c) * per_layer + c * CHECKPOINT_INPUT * sbh + (per_layer if c else 0)
    logits = LOGIT_BYTES * micro_batch * seq_len * vocab
    return kept + (logits if tp == 1 else logits / tp)


def model_state_bytes(local_params: float, dp_shard: int, data_size: int, zero_stage: int) -> float:
    """Parameters, gradients, master weights and AdamW moments of one GPU (module docstring)."""
    if zero_stage == 3:
        return STATE_BYTES_PER_PARAM * local_params / dp_shard
    if zero_stage == 2:
        return 2 * local_params + 14 * local_params / data_size
    if zero_stage == 1:
        return 4 * local_params + 12 * local_params / data_size
    raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")


@dataclass
class MemoryPlan:
    model_state_bytes: float
    """16 P / S: parameters, gradients, fp32 master weights and AdamW moments of my shard."""
    gathered_bytes: float
    """bf16 copies of the block being computed and of the next one (ZeRO-3/FSDP2 prefetch)."""
    activation_bytes: float
    """One micro-batch's activations kept for backward, logits included (under `mode`)."""
    build_peak_bytes: float
    """Building the replica partitioned (materialize.py): fp32 shards plus the largest module."""
    tokens_per_step: int
    """Training tokens per optimizer step, all groups together (micro batch x A K x L)."""
    mode: str = "none"
    """Activation checkpointing the total is computed with."""
    activations: dict = field(default_factory=dict)
    """Activation bytes under every mode: {"none": ..., "full": ..., "selective": ...}."""
    local_params: float = 0.0
    """P_t: parameters one TP rank holds (P when T = 1)."""
    state_formula: str = "16 P / S"
    """How model_state_bytes was computed, as printed."""

    @property
    def total_bytes(self) -> float:
        return self.model_state_bytes + self.gathered_bytes + self.activation_bytes


def _state_formula(tp: int, replicate: int, zero_stage: int) -> str:
    if zero_stage == 3:
        return "16 P / S" if tp == replicate == 1 else "16 P_t / D"
    return "2 P_t + 14 P_t / A" if zero_stage == 2 else "4 P_t + 12 P_t / A"


def memory_plan(params: int, world: int, groups: int, micro_batch: int, seq_len: int, hidden: int,
                layers: int, vocab: int, grad_accum: int = 1, tp: int = 1, replicate: int = 1,
                zero_stage: int = 3, activation_checkpointing: str = "none") -> MemoryPlan:
    """Per-rank memory of training one replica over S = world / groups ranks, laid out as
    replicate x dp_shard x tp; T = R = 1 with ZeRO-3/FSDP2 and no checkpointing is 16 P / S."""
    for name, value in (("micro_batch", micro_batch), ("hidden", hidden), ("layers", layers),
                        ("grad_accum", grad_accum)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0 for the memory estimate, got {value}")
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    checkpointed_layers(activation_checkpointing, layers)  # a ValueError naming the modes
    s = world // groups
    dp_shard, data_size = s // (replicate * tp), s // tp
    local = tp_params(params, hidden, layers, tp)
    largest = max(vocab * hidden, params / layers)
    tokens = micro_batch * seq_len
    acts = {mode: activation_bytes(mode, micro_batch, seq_len, hidden, layers, vocab, tp) for mode in AC_MODES}
    sharded = zero_stage == 3
    return MemoryPlan(
        model_state_bytes=model_state_bytes(local, dp_shard, data_size, zero_stage),
        gathered_bytes=2 * 2 * local / layers if sharded else 0,
        activation_bytes=acts[activation_checkpointing],
        build_peak_bytes=4 * local / dp_shard + 4 * largest if sharded else 4 * params,
        tokens_per_step=tokens * (world // tp) * grad_accum,
        mode=activation_checkpointing, activations=acts, local_params=local,
        state_formula=_state_formula(tp, replicate, zero_stage),
    )


def format_memory(m: MemoryPlan, exchange_bytes_per_step: float, human) -> list[str]:
    """Lines appended to the plan table (`human` formats bytes)."""
    rows = [
        (f"model states per rank ({m.state_formula})", m.model_state_bytes),
        ("gathered bf16 blocks per rank", m.gathered_bytes),
        ("activations per rank (one micro-batch)", m.activation_bytes),
        ("estimated total per rank", m.total_bytes),
        ("peak while building (materialize.py)", m.build_peak_bytes),
    ]
    width = max(len(name) for name, _ in rows)
    per_token = exchange_bytes_per_step / m.tokens_per_step
    checkpointing = "no activation checkpointing" if m.mode == "none" else f"activation checkpointing {m.mode}"
    head = f"memory per rank (estimate: bf16 compute, fp32 master weights, AdamW, {checkpointing}):"
    tail = (f"  training tokens per step (all groups): {m.tokens_per_step:,}; cross-group bytes per "
            f"training token: {per_token:.3f}")
    return ["", head, *(f"  {name:<{width}}  {human(value):>12}" for name, value in rows), tail]
