"""`codistill-ds plan`: the topology and the bytes one step moves across groups, on paper.

Symbols: K groups, W world ranks, S = W / K ranks per group, B exchange sequences per group per
exchange, L tokens per sequence, V vocabulary, k entries per token (k = topk, or k = V when
topk = 0), v bytes per value (bf16/fp16 2, fp32 4), i index bytes per entry (4 for top-k int32
indices, 0 for full logits), P parameters, g bytes per gradient element, I steps per exchange.

    payload per group           = B * L * k * (v + i)
    exchange_bytes_per_exchange = K * (K - 1) * payload     (every group to every other group)
    exchange_bytes_per_step     = exchange_bytes_per_exchange / I
    leaders: a leader sends       (K - 1) * payload per exchange (one cross-group link per group)
    rails:   each rank sends      (K - 1) * payload / S  per exchange (same total, S links)
    allreduce_bytes_per_step    = 2 * (W - 1) * P * g       (ring all-reduce over all W ranks:
                                  each rank sends 2 (W - 1) / W * P * g per step)
    ratio                       = allreduce_bytes_per_step / exchange_bytes_per_step

The baseline is synchronous data parallelism over the whole world; codistillation keeps its
own gradient traffic inside each group, so only the exchange crosses groups. Byte units
printed are decimal (1 KB = 1,000 bytes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes per exchanged value or gradient element."""

INDEX_BYTES = 4
"""Top-k indices travel as int32."""

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


@dataclass
class Plan:
    params: int
    """P: parameters of one replica."""
    vocab: int
    """V: vocabulary size."""
    seq_len: int
    """L: tokens per exchange sequence."""
    batch: int
    """B: exchange sequences per group per exchange."""
    topk: int
    """Entries kept per token; 0 means the full vocabulary."""
    interval: int
    """I: optimizer steps per exchange."""
    groups: int
    """K: codistillation groups."""
    world: int
    """W: ranks in the whole job."""
    ranks_per_group: int
    """S = W / K."""
    value_bytes: int
    """Bytes per exchanged value (the exchange dtype)."""
    index_bytes: int
    """Bytes per index: 4 with top-k, 0 for full logits."""
    grad_bytes: int
    """Bytes per gradient element in the all-reduce baseline."""
    entries_per_token: int
    """k: topk, or the vocabulary size for full logits."""
    payload_bytes_per_group: int
    """What one group's exchange batch of logits weighs."""
    exchange_bytes_per_exchange: int
    """All cross-group bytes one exchange moves, all groups together."""
    exchange_bytes_per_step: float
    """exchange_bytes_per_exchange / interval."""
    allreduce_bytes_per_step: int
    """All bytes a world-wide ring all-reduce of the gradients moves per step."""
    ratio: float
    """allreduce_bytes_per_step / exchange_bytes_per_step."""
    leader_bytes_per_exchange: int
    """Route leaders: bytes one leader sends across groups per exchange."""
    rail_bytes_per_exchange: float
    """Route rails: bytes each rank sends across groups per exchange."""
    allreduce_bytes_per_rank_per_step: float
    """What one rank sends in the baseline all-reduce per step."""
    weight_bytes_per_exchange: int = 0
    """Weights mode: every group's parameters to every other group, K (K-1) P w bytes, spread
    over the S rails (each rank sends its 1/S shard)."""
    weight_bytes_per_step: float = 0.0
    """weight_bytes_per_exchange / interval."""
    weight_ratio: float = 0.0
    """allreduce_bytes_per_step / weight_bytes_per_step."""
    teacher_bytes_per_rank: float = 0.0
    """Weights mode memory: one sharded frozen copy per peer, (K-1) P w / S bytes per rank."""
    teacher_forward_flops_per_rank_per_step: float = 0.0
    """Weights mode compute: each peer's teacher runs forward on my batch, ~2 P FLOPs per token:
    (K-1) * 2 P * B L / S per rank (B L = the group's tokens per step)."""
    dtype: str = "bf16"
    """Exchange dtype name."""
    grad_dtype: str = "bf16"
    """Gradient dtype name of the baseline."""
    layout: list[dict] = field(default_factory=list)
    """One {group, ranks, leader} per group; ranks are group-major and contiguous."""


def _check(
    params: int,
    vocab: int,
    seq_len: int,
    batch: int,
    topk: int,
    interval: int,
    groups: int,
    world: int,
    dtype: str,
    grad_dtype: str,
) -> None:
    positive = {
        "params": params,
        "vocab": vocab,
        "seq_len": seq_len,
        "batch": batch,
        "interval": interval,
        "world": world,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if groups < 2:
        raise ValueError(f"codistillation needs at least 2 groups, got groups={groups}")
    if world % groups:
        raise ValueError(f"world size {world} is not divisible by groups={groups}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0 (0 = full vocabulary), got {topk}")
    if topk > vocab:
        raise ValueError(f"topk {topk} exceeds the vocabulary size {vocab}")
    for name, value in (("dtype", dtype), ("grad_dtype", grad_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(DTYPE_BYTES)}")


def make_plan(
    params: int,
    vocab: int,
    seq_len: int,
    batch: int,
    topk: int,
    interval: int,
    groups: int,
    world: int,
    dtype: str = "bf16",
    grad_dtype: str = "bf16",
    weight_dtype: str = "bf16",
) -> Plan:
    """The byte budget of one codistillation layout; ValueError names any impossible input."""
    _check(params, vocab, seq_len, batch, topk, interval, groups, world, dtype, grad_dtype)
    s = world // groups
    k = topk if topk else vocab
    value_bytes, index_bytes = DTYPE_BYTES[dtype], INDEX_BYTES if topk else 0
    grad_bytes = DTYPE_BYTES[grad_dtype]
    payload = batch * seq_len * k * (value_bytes + index_bytes)
    per_exchange = groups * (groups - 1) * payload
    per_step = per_exchange / interval
    allreduce = 2 * (world - 1) * params * grad_bytes
    w = DTYPE_BYTES[weight_dtype]
    weights = groups * (groups - 1) * params * w
    layout = [
        {"group": g, "ranks": list(range(g * s, (g + 1) * s)), "leader": g * s}
        for g in range(groups)
    ]
    return Plan(
        params=params,
        vocab=vocab,
        seq_len=seq_len,
        batch=batch,
        topk=topk,
        interval=interval,
        groups=groups,
        world=world,
        ranks_per_group=s,
        value_bytes=value_bytes,
        index_bytes=index_bytes,
        grad_bytes=grad_bytes,
        entries_per_token=k,
        payload_bytes_per_group=payload,
        exchange_bytes_per_exchange=per_exchange,
        exchange_bytes_per_step=per_step,
        allreduce_bytes_per_step=allreduce,
        ratio=allreduce / per_step,
        leader_bytes_per_exchange=(groups - 1) * payload,
        rail_bytes_per_exchange=(groups - 1) * payload / s,
        allreduce_bytes_per_rank_per_step=allreduce / world,
        weight_bytes_per_exchange=weights,
        weight_bytes_per_step=weights / interval,
        weight_ratio=allreduce / (weights / interval),
        teacher_bytes_per_rank=(groups - 1) * params * w / s,
        teacher_forward_flops_per_rank_per_step=(groups - 1) * 2 * params * batch * seq_len / s,
        dtype=dtype,
        grad_dtype=grad_dtype,
        layout=layout,
    )


def human_bytes(n: float) -> str:
    """Decimal units: 1 KB = 1,000 bytes."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _span(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def _ranks(ranks: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in ranks[:limit])
    return f"[{shown}{', ...' if len(ranks) > limit else ''}]"


def _topology_lines(plan: Plan) -> list[str]:
    s, k = plan.ranks_per_group, plan.groups
    lines = [
        f"topology: {plan.world} ranks = {k} groups x {s} ranks per group",
        *(
            f"  group {e['group']}: ranks {_span(e['ranks'])}, leader {e['leader']}"
            for e in plan.layout[:8]
        ),
    ]
    if k > 8:
        lines.append(f"  ... ({k - 8} more groups)")
    lines.append(f"  leaders group: {_ranks([e['leader'] for e in plan.layout])}")
    for r in range(min(s, 4)):
        lines.append(f"  rail {r}: {_ranks([r + g * s for g in range(k)])}")
    if s > 4:
        lines.append(f"  ... ({s - 4} more rails, rail r = local rank r of every group)")
    return lines


def format_plan(plan: Plan) -> str:
    """Topology, then the byte table in human units, then the ratio."""
    k = "full vocab" if plan.topk == 0 else f"top-{plan.topk}"
    wire = f"{plan.dtype} values" + (" + int32 indices" if plan.index_bytes else "")
    rows = [
        ("payload per group per exchange", plan.payload_bytes_per_group),
        ("cross-group bytes per exchange (all groups)", plan.exchange_bytes_per_exchange),
        ("cross-group bytes per step", plan.exchange_bytes_per_step),
        ("  route leaders: per leader per exchange", plan.leader_bytes_per_exchange),
        ("  route rails: per rank per exchange", plan.rail_bytes_per_exchange),
        (
            f"all-reduce bytes per step ({plan.grad_dtype} grads, W={plan.world})",
            plan.allreduce_bytes_per_step,
        ),
        ("  all-reduce per rank per step", plan.allreduce_bytes_per_rank_per_step),
    ]
    width = max(len(name) for name, _ in rows)
    lines = _topology_lines(plan)
    lines += [
        "",
        f"model: {plan.params:,} params, vocab {plan.vocab:,}",
        (
            f"exchange: {plan.batch} seqs x {plan.seq_len} tokens per group, {k} ({wire}), "
            f"every {plan.interval} steps"
        ),
        "",
        *(f"{name:<{width}}  {human_bytes(value):>12}" for name, value in rows),
        "",
        f"ratio (all-reduce / codistill per step): {plan.ratio:,.0f}x",
        "",
        f"mode weights (shards of {plan.params:,} params to frozen teachers, every {plan.interval} steps):",
        f"  {'cross-group bytes per step':<{width - 2}}  {human_bytes(plan.weight_bytes_per_step):>12}",
        f"  {'teacher memory per rank':<{width - 2}}  {human_bytes(plan.teacher_bytes_per_rank):>12}",
        f"  teacher forward per rank per step: {plan.teacher_forward_flops_per_rank_per_step:.3g} FLOPs",
        f"  ratio (all-reduce / weights per step): {plan.weight_ratio:,.1f}x",
    ]
    return "\n".join(lines)


def parse_count(text: str) -> int:
    """'1e9', '1B', '1.5b', '350M', '125m', '10k', '1_100_000' -> an integer count."""
    match = re.fullmatch(r"\s*([0-9_.]+(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a count (e.g. 1B, 350M, 1e9)")
    try:
        number = float(match.group(1).replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a count") from None
    return round(number * _SUFFIX[match.group(2).lower()])


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `codistill-ds plan`; exchange defaults are the training config's defaults."""
    from .config import CodistillConfig

    defaults = CodistillConfig()
    add = parser.add_argument
    add("--params", type=parse_count, default=10**9, help="parameters: 1e9, 1B, 350M, 1100000")
    add("--vocab", type=parse_count, default=32000, help="vocabulary size")
    add("--seq-len", type=int, default=2048, help="tokens per exchange sequence")
    add("--batch", type=int, default=16, help="exchange sequences per group per exchange")
    add("--topk", type=int, default=defaults.topk, help="logit entries kept per token; 0 = full vocab")
    add("--interval", type=int, default=defaults.interval, help="optimizer steps per exchange")
    add("--groups", type=int, default=2, help="codistillation groups K")
    add("--world", type=int, default=16, help="total ranks W")
    add("--dtype", choices=sorted(DTYPE_BYTES), default=defaults.dtype, help="exchanged value dtype")
    add(
        "--grad-dtype",
        choices=sorted(DTYPE_BYTES),
        default="bf16",
        help="gradient dtype of the all-reduce baseline",
    )
    add("--micro-batch", type=int, default=0,
        help="training sequences per rank per micro-step: adds the memory estimate (memory.py)")
    add("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (memory estimate)")
    add("--hidden", type=int, default=0, help="hidden size (memory estimate)")
    add("--layers", type=int, default=0, help="transformer blocks (memory estimate)")
    add("--json", action="store_true", help="print one JSON object instead of the table")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan for parsed flags; 2 with one line on stderr for impossible inputs."""
    try:
        plan = make_plan(
            params=args.params,
            vocab=args.vocab,
            seq_len=args.seq_len,
            batch=args.batch,
            topk=args.topk,
            interval=args.interval,
            groups=args.groups,
            world=args.world,
            dtype=args.dtype,
            grad_dtype=getattr(args, "grad_dtype", "bf16"),
        )
        memory = None
        if getattr(args, "micro_batch", 0):
            from .memory import memory_plan

            memory = memory_plan(args.params, args.world, args.groups, args.micro_batch, args.seq_len,
                                 args.hidden, args.layers, args.vocab, args.grad_accum)
    except ValueError as exc:
        print(f"codistill-ds plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(plan), **({"memory": asdict(memory)} if memory else {})}))
    else:
        print(format_plan(plan))
        if memory is not None:
            from .memory import format_memory

            print("\n".join(format_memory(memory, plan.exchange_bytes_per_step, human_bytes)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m codistill_ds.plan --params 1B``."""
    parser = argparse.ArgumentParser(prog="codistill-ds plan", description=__doc__.split("\n")[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
