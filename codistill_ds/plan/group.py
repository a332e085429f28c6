"""Inside each group, on paper: layout, memory per GPU under every activation-checkpointing mode,
and traffic per optimizer step (`codistill-ds plan --tp T --replicate R ...`).

The formulas are in memory.py (model states, activations) and traffic.py (tensor-parallel,
sharding and replica collectives); this module checks that the shape splits T ways, composes the
two and prints the section. Cross-group bytes come from bytes.py unchanged: T does not enter them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.plan.bytes import Plan
from codistill_ds.plan.memory import (
    AC_MODES,
    MemoryPlan,
    checkpointed_layers,
    memory_plan,
    tp_params,
)
from codistill_ds.plan.traffic import GroupTraffic, group_traffic

REDUCE_BYTES = {"fp32": 4, "bf16": 2}
AC_NAMES = {"none": "no checkpointing", "full": "full (every layer)", "selective": "selective (every second layer)"}


@dataclass
class GroupPlan:
    tp: int
    """T: tensor-parallel ranks."""
    replicate: int
    """R: HSDP replicas."""
    dp_shard: int
    """D = S / (R T): ranks one replica's parameters are sharded over (per TP rank)."""
    data_size: int
    """A = R D: ranks that read different tokens."""
    ranks_per_group: int
    """S."""
    gpus_per_node: int
    """G."""
    zero_stage: int
    """3: ZeRO-3 / FSDP2 (HSDP when R > 1); 1, 2: DeepSpeed ZeRO-1/2 (with AutoTP when T > 1)."""
    activation_checkpointing: str
    """The mode the memory total is computed with."""
    checkpointed_layers: int
    """c: layers that mode wraps."""
    sharding: str
    """What shards the replica, in words."""
    memory: MemoryPlan
    traffic: GroupTraffic
    micro_batch: int = 1
    seq_len: int = 1
    grad_accum: int = 1
    cross_group_per_gpu_per_step: float = 0.0
    """Route rails: (K - 1) payload / (S I), the same for every T (tp_rows.py)."""
    cross_group_leaving_group_per_step: float = 0.0
    """The byte table's codistillation row: (K - 1) payload / I."""
    notes: list[str] = field(default_factory=list)

    @property
    def nodes_per_group(self) -> float:
        return self.ranks_per_group / self.gpus_per_node


def check_tp_shape(tp: int, vocab: int, heads: int | None, kv_heads: int | None,
                   intermediate: int | None) -> None:
    """ValueError naming the flag unless T splits the model evenly (the same rule as
    backends/tensor_parallel.check_tp_divisible at start)."""
    sizes = {"--heads": heads, "--kv-heads": kv_heads if kv_heads else heads, "--intermediate": intermediate,
             "--vocab": vocab}
    for flag, value in sizes.items():
        if value is not None and value % tp:
            raise ValueError(f"{flag} {value:,} is not divisible by --tp {tp} (each TP rank takes an equal "
                             f"1/T of heads, KV heads, MLP columns and vocabulary)")


def _sharding(tp: int, replicate: int, zero_stage: int) -> str:
    if zero_stage == 3:
        if replicate > 1:
            base = "HSDP (FSDP2 over dp_shard, replicated over replicate)"
        else:
            base = "FSDP2 over dp_shard" if tp > 1 else "FSDP2 or ZeRO-3 over dp_shard"
        return base + (" + DTensor TP" if tp > 1 else "")
    return f"DeepSpeed ZeRO-{zero_stage} over the A data ranks" + (" + AutoTP" if tp > 1 else "")


def group_plan(plan: Plan, micro_batch: int, hidden: int, layers: int, *, tp: int = 1, replicate: int = 1,
               gpus_per_node: int | None = None, zero_stage: int = 3, activation_checkpointing: str = "none",
               grad_accum: int = 1, reduce_dtype: str = "fp32", heads: int | None = None,
               kv_heads: int | None = None, intermediate: int | None = None) -> GroupPlan:
    """Memory and traffic inside each group of `plan`'s layout; ValueError for impossible inputs."""
    if tp < 1 or replicate < 1:
        raise ValueError(f"tp and replicate must be >= 1, got tp={tp}, replicate={replicate}")
    if reduce_dtype not in REDUCE_BYTES:
        raise ValueError(f"reduce_dtype {reduce_dtype!r} is not one of {', '.join(REDUCE_BYTES)}")
    check_tp_shape(tp, plan.vocab, heads, kv_heads, intermediate)
    gpus = plan.ranks_per_group if gpus_per_node is None else gpus_per_node
    c = checkpointed_layers(activation_checkpointing, layers) if layers > 0 else 0
    # the layout first (a ValueError naming the degrees), then the memory that divides by them
    traffic = group_traffic(plan.world, plan.groups, tp, replicate, gpus, zero_stage,
                            tp_params(plan.params, hidden, layers, tp), micro_batch, plan.seq_len, hidden,
                            layers, c, grad_accum, REDUCE_BYTES[reduce_dtype])
    memory = memory_plan(plan.params, plan.world, plan.groups, micro_batch, plan.seq_len, hidden, layers,
                         plan.vocab, grad_accum, tp, replicate, zero_stage, activation_checkpointing)
    notes = []
    dims = ParallelDims(world_size=plan.world, groups=plan.groups, rank=0, replicate=replicate, tp=tp)
    if zero_stage != 3 and tp > 1:
        notes.append("AutoTP gathers the logits whole (10 b L V bytes, not / T) and its lm_head adds an "
                     "all-gather of them: not in these figures")
    return GroupPlan(
        tp=tp, replicate=replicate, dp_shard=dims.dp_shard, data_size=dims.data_size, ranks_per_group=dims.group_size,
        gpus_per_node=gpus, zero_stage=zero_stage, activation_checkpointing=activation_checkpointing,
        checkpointed_layers=c, sharding=_sharding(tp, replicate, zero_stage), memory=memory, traffic=traffic,
        micro_batch=micro_batch, seq_len=plan.seq_len, grad_accum=grad_accum,
        cross_group_per_gpu_per_step=plan.rail_bytes_per_exchange / plan.interval,
        cross_group_leaving_group_per_step=plan.boundary["codistill"], notes=notes,
    )


def _nodes(gp: GroupPlan) -> str:
    n = gp.nodes_per_group
    if n >= 1:
        return f"{n:g} node{'s' if n > 1 else ''} of {gp.gpus_per_node} GPUs"
    return f"{gp.ranks_per_group} of a node's {gp.gpus_per_node} GPUs"


def format_group(gp: GroupPlan, human) -> list[str]:
    """The section printed after the memory lines (`human` formats bytes)."""
    m, t = gp.memory, gp.traffic
    lines = ["", (f"inside each group (estimate; formulas in codistill_ds/plan/memory.py and traffic.py): "
                  f"{gp.ranks_per_group} ranks = replicate {gp.replicate} x dp_shard {gp.dp_shard} x tp {gp.tp} "
                  f"on {_nodes(gp)}; {gp.sharding}"),
             (f"  {gp.data_size} data ranks x {gp.micro_batch} sequence{'s' if gp.micro_batch > 1 else ''} of {gp.seq_len:,} tokens per micro-step, "
              f"{gp.grad_accum} micro-step{'s' if gp.grad_accum > 1 else ''} per optimizer step; parameters per "
              f"TP rank P_t = {m.local_params:,.0f}")]
    lines.append("  activations per GPU, one micro-batch (Korthikanti et al. 2022: L b h (10 + 24 / T) per layer, "
                 "2 L b h per checkpointed layer):")
    width = max(len(n) for n in AC_NAMES.values())
    for mode in AC_MODES:
        mark = "   <- model.activation_checkpointing" if mode == gp.activation_checkpointing else ""
        lines.append(f"    {AC_NAMES[mode]:<{width}}  {human(m.activations[mode]):>12}{mark}")
    rows = []
    if gp.tp > 1:
        rows.append((f"tensor parallel: {t.tp_all_reduces} all-reduces x {human(t.tp_message_bytes)} per micro-step",
                     t.tp_bytes_per_gpu, 0.0))
    for c in t.collectives:
        if c["ranks"] == 1:  # nothing to gather or reduce over one rank
            continue
        rows.append((f"{c['name']} ({c['axis']}, {c['ranks']} ranks)", c["per_gpu"], c["leaving_node"]))
    rows.append(("inside the group, all of the above", t.tp_bytes_per_gpu + sum(c["per_gpu"] for c in t.collectives),
                 t.leaving_node_bytes))
    name_width = max(len(r[0]) for r in rows)
    head = "traffic per optimizer step (ring collectives):"
    lines.append(f"  {head:<{name_width + 2}}  {'per GPU':>12}  {'leaving a node':>14}")
    lines += [f"    {name:<{name_width}}  {human(per_gpu):>12}  {human(node):>14}" for name, per_gpu, node in rows]
    lines.append(f"    leaving a node per GPU (its NICs sharing it evenly): {human(t.leaving_node_bytes_per_gpu)}")
    lines.append(f"  cross-group per step (unchanged by T: each TP rank sends 1/T of its data rank's rows): "
                 f"{human(gp.cross_group_per_gpu_per_step)} per GPU on rails, "
                 f"{human(gp.cross_group_leaving_group_per_step)} leaving a group")
    lines += [f"  note: {n}" for n in gp.notes]
    return lines
