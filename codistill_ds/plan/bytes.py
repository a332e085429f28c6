"""The bytes one step sends across the group boundary, like for like (`codistill-ds plan`).

What a user pays for is what crosses the slow boundary between groups (nodes, racks, sites).
The plan lays every method over the same K nodes, one codistillation group of S = W / K ranks per
node, and counts the bytes leaving one node per step (each direction of its boundary link
carries as much) and per training token (all nodes' boundary bytes / all groups' tokens).

Symbols: P parameters, g bytes per gradient (or parameter) element, B exchange sequences per
group per exchange, L tokens per sequence, m = round(f L) positions sent per sequence
(`token_fraction` f), k entries per position, I steps per exchange, T training tokens per group
per step, H DiLoCo inner steps, b bytes per pseudo-gradient element, k_wire the wire format's
bytes per position (`compression.WireFormat.bytes_per_token`: k (value + id bytes) + 1 scale
byte for fp8).

    payload per group per exchange      = B m k_wire
    codistillation, per node per step   = (K - 1) payload / I        (both routes: the leader's
                                          link carries it whole, rails split it over S links)
    ring all-reduce over W ranks        = 2 (W - 1) / W g P           (the ring's link across
                                          each node boundary carries one rank's whole share)
    hierarchical all-reduce             = 2 (K - 1) / K g P           (reduce-scatter inside the
                                          node, ring across the K nodes, all-gather inside)
    ZeRO-3 over one world-wide group    = 3 (W - 1) / W g P           (parameter all-gather in
                                          forward and in backward, gradient reduce-scatter)
    DiLoCo (arXiv 2311.08105)           = 2 (K - 1) / K b P / H       (one pseudo-gradient
                                          all-reduce across the K replicas every H steps)
    Streaming DiLoCo (arXiv 2501.18512) = the same with b = 4 bits; fragments spread the bytes
                                          over the H steps, they do not reduce them
    per training token                  = per node per step / T
    codistillation cheaper than DiLoCo  when P > (K - 1) payload / I x H / (2 (K - 1) / K b)

Codistillation's bytes grow with tokens, not with parameters. Summing every rank's ring traffic
(`ring_all_ranks_bytes_per_step`, mostly intra-node) and dividing it by the exchange is not a
like-for-like figure; it is reported only as what the instrumented benchmark measures. Units are
decimal (1 KB = 1,000 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the wire module needs torch: `codistill-ds --help` and `plan` start without it
    from codistill_ds.exchange.wire import WireFormat

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per gradient, parameter or pseudo-gradient element."""

STREAMING_DILOCO_PAPER = {"params": 10**9, "tokens": 100 * 10**9, "bytes": 4.42e12}
"""arXiv 2501.18512, Table 1 as docs/design.md quotes it: 1B parameters, 100B tokens, 4.42 TB
exchanged in all at parity with data parallel: 44.2 bytes per training token."""

RATIO_OF = ("bytes per step leaving one node (one group per node) for each baseline, divided by "
            "codistillation's bytes per step leaving one node")


@dataclass
class Plan:
    params: int
    """P: parameters of one replica."""
    vocab: int
    """V: vocabulary size."""
    seq_len: int
    """L: tokens per exchange and training sequence."""
    batch: int
    """B: exchange sequences per group per exchange."""
    topk: int
    """Entries kept per position; 0 means the full vocabulary."""
    interval: int
    """I: optimizer steps per exchange."""
    groups: int
    """K: codistillation groups, one per node."""
    world: int
    """W: ranks in the whole job."""
    ranks_per_group: int
    """S = W / K."""
    wire: dict
    """The wire format (`compression.WireFormat`): k, value_dtype, index_dtype, kind."""
    wire_bytes_per_position: int
    """k_wire: bytes one sent position costs, scale byte included."""
    positions_per_sequence: int
    """m = round(token_fraction x L): sent positions per exchange sequence."""
    train_tokens_per_group_per_step: int
    """T: training tokens one group consumes per optimizer step."""
    payload_bytes_per_group: int
    """B m k_wire: one group's exchange batch of predictions."""
    exchange_bytes_per_exchange: int
    """All cross-group bytes one exchange moves, all groups together: K (K - 1) payload."""
    exchange_bytes_per_step: float
    """exchange_bytes_per_exchange / I (all nodes together)."""
    leader_bytes_per_exchange: int
    """Route leaders: bytes one leader sends across groups per exchange, (K - 1) payload."""
    rail_bytes_per_exchange: float
    """Route rails: bytes each rank sends across groups per exchange, (K - 1) payload / S."""
    boundary: dict
    """Bytes per step leaving one node, per method (codistill, ring, hierarchical, zero3,
    diloco_fp32, diloco_bf16, streaming_diloco)."""
    per_token: dict
    """The same per training token: boundary bytes of all nodes / training tokens of all groups."""
    ratios: dict
    """boundary[method] / boundary["codistill"] for every baseline (see ratio_of)."""
    ratio: float
    """ratios["ring"]: the ring all-reduce's bytes per node boundary / codistillation's."""
    ratio_of: str = RATIO_OF
    """What every ratio divides."""
    cheaper_than_diloco_above_params: dict = field(default_factory=dict)
    """Model size above which codistillation sends fewer boundary bytes than each DiLoCo
    variant at these tokens per step (the crossover P of the formulas above)."""
    streaming_diloco_paper_bytes_per_token: float = 0.0
    """The published 1B figure (4.42 TB / 100B tokens), independent of this shape."""
    ring_all_ranks_bytes_per_step: int = 0
    """2 (W - 1) P g: every rank's ring traffic summed, mostly intra-node. Not a like-for-like
    baseline; what the benchmark's collective counter measures."""
    diloco_h: int = 500
    """DiLoCo inner steps per outer step."""
    streaming_h: int = 100
    """Streaming DiLoCo inner steps per full model synchronization."""
    grad_dtype: str = "bf16"
    """Gradient (and ZeRO-3 parameter) dtype of the synchronous baselines."""
    weight_bytes_per_exchange: int = 0
    """Weights mode: every group's parameters to every other group, K (K-1) P w bytes, spread
    over the S rails (each rank sends its 1/S shard)."""
    weight_bytes_per_step: float = 0.0
    """weight_bytes_per_exchange / interval."""
    weight_ratio: float = 0.0
    """boundary["ring"] / weights mode's bytes per step leaving one node, (K - 1) P w / I."""
    teacher_bytes_per_rank: float = 0.0
    """Weights mode memory: one sharded frozen copy per peer, (K-1) P w / S bytes per rank."""
    teacher_forward_flops_per_rank_per_step: float = 0.0
    """Weights mode compute: each peer's teacher runs forward on my batch, ~2 P FLOPs per token:
    (K-1) * 2 P * T / S per rank."""
    layout: list[dict] = field(default_factory=list)
    """One {group, ranks, leader} per group; ranks are group-major and contiguous."""
    gpus_per_node: int | None = None
    """G when a group spans several nodes (or shares one); None: one group per node (G = S).
    The boundary is then a group's, of its S / G nodes; the formulas do not change."""


def _check(params: int, seq_len: int, batch: int, interval: int, groups: int, world: int,
           token_fraction: float, diloco_h: int, streaming_h: int, train_batch: int) -> None:
    positive = {"params": params, "seq_len": seq_len, "batch": batch, "interval": interval,
                "world": world, "diloco_h": diloco_h, "streaming_h": streaming_h,
                "train_batch": train_batch}
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if groups < 2:
        raise ValueError(f"codistillation needs at least 2 groups, got groups={groups}")
    if world % groups:
        raise ValueError(f"world size {world} is not divisible by groups={groups}")
    if not 0.0 < token_fraction <= 1.0:
        raise ValueError(f"token_fraction must be in (0, 1], got {token_fraction}")


def _wire(topk: int, vocab: int, dtype: str, index_dtype: str) -> WireFormat:
    from codistill_ds.exchange.wire import WireFormat

    if topk > vocab:
        raise ValueError(f"topk {topk} exceeds the vocabulary size {vocab}")
    try:
        return WireFormat.choose(topk, vocab, dtype, index_dtype)
    except ValueError as exc:
        raise ValueError(f"wire format: {exc}") from None


def _boundaries(params: int, groups: int, world: int, g: int, codistill: float, diloco_h: int,
                streaming_h: int) -> dict:
    """Bytes per step leaving one node, one entry per method (formulas in the module docstring)."""
    k, w, p = groups, world, params
    across = 2 * (k - 1) / k  # all-reduce across the K nodes (hierarchical, DiLoCo)
    return {
        "codistill": codistill,
        "ring": 2 * (w - 1) / w * g * p,
        "hierarchical": across * g * p,
        "zero3": 3 * (w - 1) / w * g * p,
        "diloco_fp32": across * 4 * p / diloco_h,
        "diloco_bf16": across * 2 * p / diloco_h,
        "streaming_diloco": across * 0.5 * p / streaming_h,
    }


def _crossovers(groups: int, codistill: float, diloco_h: int, streaming_h: int) -> dict:
    """P at which a DiLoCo variant's boundary bytes equal codistillation's (independent of P)."""
    across = 2 * (groups - 1) / groups
    return {"diloco_fp32": codistill * diloco_h / (across * 4),
            "diloco_bf16": codistill * diloco_h / (across * 2),
            "streaming_diloco": codistill * streaming_h / (across * 0.5)}


def make_plan(params: int, vocab: int, seq_len: int, batch: int, topk: int, interval: int,
              groups: int, world: int, dtype: str = "bf16", grad_dtype: str = "bf16",
              weight_dtype: str = "bf16", index_dtype: str = "auto", token_fraction: float = 1.0,
              train_batch: int | None = None, diloco_h: int = 500,
              streaming_h: int = 100, gpus_per_node: int | None = None) -> Plan:
    """The byte budget of one codistillation layout against its baselines; ValueError names any
    impossible input. `train_batch` (sequences per group per step) defaults to `batch`;
    `gpus_per_node` (default: S, one group per node) only changes how the layout is described."""
    from codistill_ds.exchange.sampling import positions_per_sequence

    train_batch = batch if train_batch is None else train_batch
    _check(params, seq_len, batch, interval, groups, world, token_fraction, diloco_h,
           streaming_h, train_batch)
    for name, value in (("grad_dtype", grad_dtype), ("weight_dtype", weight_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(DTYPE_BYTES)}")
    fmt = _wire(topk, vocab, dtype, index_dtype)
    if gpus_per_node is not None and (gpus_per_node < 1 or world % gpus_per_node):
        raise ValueError(f"world size {world} is not a whole number of nodes of gpus_per_node={gpus_per_node}")
    s, m = world // groups, positions_per_sequence(seq_len, token_fraction)
    tokens = train_batch * seq_len
    payload = batch * m * fmt.bytes_per_token
    codistill = (groups - 1) * payload / interval
    boundary = _boundaries(params, groups, world, DTYPE_BYTES[grad_dtype], codistill, diloco_h,
                           streaming_h)
    ratios = {name: value / codistill for name, value in boundary.items() if name != "codistill"}
    w = DTYPE_BYTES[weight_dtype]
    paper = STREAMING_DILOCO_PAPER
    return Plan(
        params=params, vocab=vocab, seq_len=seq_len, batch=batch, topk=topk, interval=interval,
        groups=groups, world=world, ranks_per_group=s,
        wire={"k": fmt.k, "value_dtype": fmt.value_dtype, "index_dtype": fmt.index_dtype,
              "kind": fmt.kind, "scale": fmt.scale, "describe": fmt.describe()},
        wire_bytes_per_position=fmt.bytes_per_token, positions_per_sequence=m,
        train_tokens_per_group_per_step=tokens, payload_bytes_per_group=payload,
        exchange_bytes_per_exchange=groups * (groups - 1) * payload,
        exchange_bytes_per_step=groups * (groups - 1) * payload / interval,
        leader_bytes_per_exchange=(groups - 1) * payload,
        rail_bytes_per_exchange=(groups - 1) * payload / s,
        boundary=boundary,
        per_token={name: value / tokens for name, value in boundary.items()},
        ratios=ratios, ratio=ratios["ring"],
        cheaper_than_diloco_above_params=_crossovers(groups, codistill, diloco_h, streaming_h),
        streaming_diloco_paper_bytes_per_token=paper["bytes"] / paper["tokens"],
        ring_all_ranks_bytes_per_step=2 * (world - 1) * params * DTYPE_BYTES[grad_dtype],
        diloco_h=diloco_h, streaming_h=streaming_h, grad_dtype=grad_dtype,
        weight_bytes_per_exchange=groups * (groups - 1) * params * w,
        weight_bytes_per_step=groups * (groups - 1) * params * w / interval,
        weight_ratio=boundary["ring"] / ((groups - 1) * params * w / interval),
        teacher_bytes_per_rank=(groups - 1) * params * w / s,
        teacher_forward_flops_per_rank_per_step=(groups - 1) * 2 * params * tokens / s,
        layout=[{"group": g, "ranks": list(range(g * s, (g + 1) * s)), "leader": g * s}
                for g in range(groups)],
        gpus_per_node=None if gpus_per_node == s else gpus_per_node,
    )
