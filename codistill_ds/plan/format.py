"""Text output of `codistill-ds plan`: the like-for-like byte table first, then the details.

Kept apart from the formulas (bytes.py) so that each reads on its own. Units are decimal
(1 KB = 1,000 bytes).
"""

from __future__ import annotations

from codistill_ds.plan.bytes import Plan
from codistill_ds.plan.units import human_bytes, human_count


def _span(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def _ranks(ranks: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in ranks[:limit])
    return f"[{shown}{', ...' if len(ranks) > limit else ''}]"


def _placement(plan: Plan) -> str:
    """Where a group sits: one group per node unless --gpus-per-node says otherwise."""
    s, g = plan.ranks_per_group, plan.gpus_per_node
    if g is None:
        return "one group per node"
    if s >= g:
        return f"{s // g} nodes of {g} GPUs per group"
    return f"{g // s} groups per node of {g} GPUs"


def _boundary(plan: Plan) -> str:
    """What the byte table's boundary is: a node's, or a group's when groups span nodes."""
    return "node" if plan.gpus_per_node is None else "group"


def _topology_lines(plan: Plan) -> list[str]:
    s, k = plan.ranks_per_group, plan.groups
    lines = [f"topology: {plan.world} ranks = {k} groups x {s} ranks per group ({_placement(plan)})"]
    lines += [f"  group {e['group']}: ranks {_span(e['ranks'])}, leader {e['leader']}"
              for e in plan.layout[:8]]
    if k > 8:
        lines.append(f"  ... ({k - 8} more groups)")
    lines.append(f"  leaders group: {_ranks([e['leader'] for e in plan.layout])}")
    for r in range(min(s, 4)):
        lines.append(f"  rail {r}: {_ranks([r + g * s for g in range(k)])}")
    if s > 4:
        lines.append(f"  ... ({s - 4} more rails, rail r = local rank r of every group)")
    return lines


def _method_names(plan: Plan) -> dict[str, str]:
    g, w, k = plan.grad_dtype, plan.world, plan.groups
    return {
        "codistill": "codistillation (leaders or rails)",
        "ring": f"ring all-reduce ({g} grads, W={w})",
        "hierarchical": f"hierarchical all-reduce ({g} grads, N={k} {_boundary(plan)}s)",
        "zero3": f"ZeRO-3 over all W={w} ranks ({g})",
        "diloco_fp32": f"DiLoCo H={plan.diloco_h}, fp32 pseudo-gradient",
        "diloco_bf16": f"DiLoCo H={plan.diloco_h}, bf16 pseudo-gradient",
        "streaming_diloco": f"Streaming DiLoCo H={plan.streaming_h}, 4-bit",
    }


def _boundary_table(plan: Plan) -> list[str]:
    names = _method_names(plan)
    width = max(len(n) for n in names.values())
    head = f"{'':<{width}}  {'per step':>12}  {'per token':>12}  {'vs codistill':>12}"
    lines = [head]
    for key, name in names.items():
        ratio = "1x" if key == "codistill" else f"{plan.ratios[key]:,.1f}x"
        lines.append(f"{name:<{width}}  {human_bytes(plan.boundary[key]):>12}  "
                     f"{plan.per_token[key]:>10,.1f} B  {ratio:>12}")
    return lines


def _crossover_line(plan: Plan) -> str:
    c = plan.cheaper_than_diloco_above_params
    return (f"codistillation sends fewer boundary bytes than DiLoCo above "
            f"{human_count(c['diloco_fp32'])} params (fp32), {human_count(c['diloco_bf16'])} "
            f"(bf16); than Streaming DiLoCo above {human_count(c['streaming_diloco'])}")


def _weights_lines(plan: Plan) -> list[str]:
    return [
        (f"mode weights (shards of {plan.params:,} params to frozen teachers, every "
         f"{plan.interval} steps):"),
        f"  cross-group bytes per step (all groups): {human_bytes(plan.weight_bytes_per_step)}",
        f"  teacher memory per rank: {human_bytes(plan.teacher_bytes_per_rank)}",
        f"  teacher forward per rank per step: {plan.teacher_forward_flops_per_rank_per_step:.3g} FLOPs",
        f"  ratio (ring all-reduce / weights, per node boundary): {plan.weight_ratio:,.1f}x",
    ]


def _table_head(plan: Plan) -> str:
    if plan.gpus_per_node is None:
        return (f"bytes leaving one node per step (each direction of its boundary), {plan.groups} nodes "
                f"x {plan.ranks_per_group} ranks, one group per node; per token = per training token:")
    return (f"bytes leaving one group per step (each direction of its boundary), {plan.groups} groups "
            f"x {plan.ranks_per_group} ranks, {_placement(plan)}; per token = per training token:")


def format_plan(plan: Plan) -> str:
    """The like-for-like table first, then topology, routes and the weights mode."""
    m, seq = plan.positions_per_sequence, plan.seq_len
    positions = f"{seq} tokens" if m == seq else f"{m} of {seq} positions"
    lines = [
        (f"model: {plan.params:,} params, vocab {plan.vocab:,}; "
         f"{plan.train_tokens_per_group_per_step:,} training tokens per group per step"),
        (f"exchange: {plan.batch} seqs x {positions} per group every {plan.interval} steps, "
         f"{plan.wire['describe']} = {plan.wire_bytes_per_position} B per position"),
        "",
        _table_head(plan),
        *_boundary_table(plan),
        (f"  (Streaming DiLoCo as published, 1B params / 100B tokens: "
         f"{plan.streaming_diloco_paper_bytes_per_token:.1f} B per token)"),
        _crossover_line(plan),
        "",
        (f"routes, per exchange: leaders {human_bytes(plan.leader_bytes_per_exchange)} per leader; "
         f"rails {human_bytes(plan.rail_bytes_per_exchange)} per rank"),
        "",
        *_topology_lines(plan),
        "",
        *_weights_lines(plan),
    ]
    return "\n".join(lines)
