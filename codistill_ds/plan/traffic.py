"""Traffic inside one codistillation group per optimizer step, on paper (`codistill-ds plan --tp`).

Symbols as in memory.py: a group of S = R D T ranks, A = R D data ranks, G GPUs per node, b micro
batch (sequences per data rank), L sequence length, h hidden size, n layers, c checkpointed layers,
P_t parameters per TP rank, m micro-steps per optimizer step (grad_accum). Every collective is a
ring: a ring over N ranks sends, on each of its links, (N - 1)/N M for an all-gather (M the
gathered size) or a reduce-scatter (M the input size) and 2 (N - 1)/N M for an all-reduce; every
member sends that much ("per GPU"), and a ring whose members sit on several nodes crosses each of
those nodes' boundaries once outward ("leaving one node": the sum over the rings through the
busiest node). Rings follow the ranks' order (`distributed/axes.py`: rank = g S + (r D + d) T + t,
node = rank // G); NCCL's trees and multi-channel rings move the same bytes in other patterns.

Tensor parallelism (torch's column/row-wise styles, `backends/tensor_parallel.py`, no sequence
parallelism): per micro-step, all-reduces of one bf16 activation b L h (M = 2 b L h bytes):

    forward    2 per layer (o_proj, down_proj outputs) + 1 (embedding output)
    backward   5 per layer (q, k, v, gate, up input gradients: one per column-wise linear) + 1
               (lm_head input gradient)
    recompute  1 per checkpointed layer: its forward runs again inside backward, and torch's
               non-reentrant checkpoint stops once every saved tensor is back, before down_proj's
               output all-reduce (o_proj's is rerun)
    per GPU    m (7 n + 2 + c) 2 (T - 1)/T M

Counted on a real TP Llama (FSDP2 on top, every checkpointing mode) by
tests/unit/test_plan_group.py on a fake process group. Megatron's fused layout needs 2 + 2 per
layer; torch's styles all-reduce each column-wise input gradient separately. FSDP2 gathers
nothing more under checkpointing: the recomputed forward runs while the layer is unsharded for
its backward. Not counted: loss_parallel's per-token max and sums (3 x 4 b L bytes) and
the exchange's candidate gathers over tp (top-k ids and values of the exchange batch).

Sharding inside the group (per micro-step unless said):

    ZeRO-3 / FSDP2   all-gather of bf16 parameters in forward and again in backward
                     (reshard_after_forward, the default): 2 x (D - 1)/D 2 P_t over dp_shard;
                     reduce-scatter of gradients: (D - 1)/D g_r P_t, g_r = 4 (FSDP2 reduces in
                     fp32 here, sharding.apply_fsdp) or 2 (DeepSpeed ZeRO-3 in bf16)
    HSDP (R > 1)     + all-reduce of the gradient shard across the R replicas:
                     2 (R - 1)/R g_r P_t / D over replicate
    ZeRO-1 (AutoTP)  per optimizer step: all-reduce of bf16 gradients 2 (A - 1)/A 2 P_t and
                     all-gather of the updated bf16 parameters (A - 1)/A 2 P_t
    ZeRO-2           reduce-scatter of bf16 gradients (A - 1)/A 2 P_t per micro-step, the same
                     all-gather per optimizer step (ZeRO paper, section 7: 2 P like DP)

Cross-group bytes are the byte table's (bytes.py): each TP rank sends a distinct 1/T of its data
rank's rows (exchange/transport/tp_rows.py), so T does not change them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from codistill_ds.distributed.axes import ParallelDims

TP_FORWARD = (2, 1)
"""All-reduces in forward: (per layer, once): o_proj and down_proj outputs; the embedding."""
TP_BACKWARD = (5, 1)
"""All-reduces in backward: (per layer, once): q, k, v, gate and up input gradients; lm_head's."""
TP_RECOMPUTE = 1
"""All-reduces of a checkpointed layer's forward run again in backward (o_proj's; measured)."""
ACTIVATION_BYTES = 2
"""bf16 activations on the TP wire."""


def tp_all_reduces(layers: int, checkpointed: int) -> int:
    """All-reduces of one b L h activation per micro-step: 7 n + 2 + c."""
    return (TP_FORWARD[0] + TP_BACKWARD[0]) * layers + TP_FORWARD[1] + TP_BACKWARD[1] + TP_RECOMPUTE * checkpointed


def leaving_node(rings: list[list[int]], per_link: float, gpus_per_node: int) -> float:
    """Bytes leaving the busiest node when every ring sends `per_link` on each of its links: a
    ring spanning several nodes crosses each of their boundaries once outward."""
    out: dict[int, float] = defaultdict(float)
    for ring in rings:
        nodes = {rank // gpus_per_node for rank in ring}
        if len(nodes) > 1:
            for node in nodes:
                out[node] += per_link
    return max(out.values(), default=0.0)


@dataclass
class GroupTraffic:
    tp_all_reduces: int
    """All-reduces of one b L h activation per micro-step (7 n + 2 + c; 0 when T = 1)."""
    tp_message_bytes: int
    """M = 2 b L h: one all-reduced bf16 activation."""
    tp_bytes_per_gpu: float
    """m N 2 (T - 1)/T M: what one GPU sends on its TP links per optimizer step (inside a node)."""
    collectives: list[dict] = field(default_factory=list)
    """Sharding collectives: {name, axis, ranks (size of each ring), per_gpu, leaving_node} per
    optimizer step."""
    leaving_node_bytes: float = 0.0
    """Sum over `collectives` (and TP, 0 inside a node) of the bytes leaving one node per step."""
    gpus_per_node: int = 8
    """G."""

    @property
    def leaving_node_bytes_per_gpu(self) -> float:
        """leaving_node_bytes / G: each GPU's share when the node's NICs carry it evenly."""
        return self.leaving_node_bytes / self.gpus_per_node


def _rings(dims: ParallelDims, axis: str) -> list[list[int]]:
    if axis == "data":  # ZeRO-1/2's data-parallel group: all A data ranks with my TP rank
        seen = {tuple(dims.data_parallel_ranks(r)): None for r in range(dims.world_size)}
        return [list(r) for r in seen]
    return dims.axis_partitions(axis)


def _collective(dims: ParallelDims, gpus_per_node: int, name: str, axis: str, kind: str,
                size: float, times: int) -> dict:
    """One kind of ring collective per optimizer step: `times` of them, each over `size` bytes."""
    rings = _rings(dims, axis)
    n = len(rings[0])
    factor = {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 2}[kind] * (n - 1) / n
    per_link = times * factor * size
    return {"name": name, "axis": axis, "kind": kind, "ranks": n, "per_gpu": per_link,
            "leaving_node": leaving_node(rings, per_link, gpus_per_node)}


def group_traffic(world: int, groups: int, tp: int, replicate: int, gpus_per_node: int, zero_stage: int,
                  local_params: float, micro_batch: int, seq_len: int, hidden: int, layers: int,
                  checkpointed: int, grad_accum: int = 1, reduce_bytes: int = 4) -> GroupTraffic:
    """Bytes per optimizer step inside each group (module docstring); ValueError for a layout
    that cannot be placed (TP across nodes, a partial node, HSDP without full sharding)."""
    dims = ParallelDims(world_size=world, groups=groups, rank=0, replicate=replicate, tp=tp)
    if gpus_per_node < 1 or world % gpus_per_node:
        raise ValueError(f"world size {world} is not a whole number of nodes of {gpus_per_node} GPUs (--gpus-per-node)")
    if gpus_per_node % tp:
        raise ValueError(f"tp {tp} does not divide --gpus-per-node {gpus_per_node}: TP ranks would span nodes "
                         "(TP is innermost and contiguous; keep it inside a node)")
    if replicate > 1 and zero_stage != 3:
        raise ValueError(f"replicate {replicate} (HSDP) needs full sharding (FSDP2, --zero-stage 3); "
                         f"DeepSpeed ZeRO-{zero_stage} shards over the whole group")
    _, R, D, T = dims.shape
    m, p, g = grad_accum, local_params, gpus_per_node
    message = ACTIVATION_BYTES * micro_batch * seq_len * hidden
    count = tp_all_reduces(layers, checkpointed) if T > 1 else 0
    tp_bytes = m * count * 2 * (T - 1) / T * message
    if zero_stage == 3:
        parts = [_collective(dims, g, "all-gather of bf16 parameters, forward + backward", "dp_shard",
                             "all-gather", 2 * p, 2 * m),
                 _collective(dims, g, f"reduce-scatter of {'fp32' if reduce_bytes == 4 else 'bf16'} gradients",
                             "dp_shard", "reduce-scatter", reduce_bytes * p, m)]
        if R > 1:
            parts.append(_collective(dims, g, "HSDP all-reduce of gradient shards", "replicate", "all-reduce",
                                     reduce_bytes * p / D, m))
    elif zero_stage == 2:
        parts = [_collective(dims, g, "reduce-scatter of bf16 gradients", "data", "reduce-scatter", 2 * p, m),
                 _collective(dims, g, "all-gather of updated bf16 parameters", "data", "all-gather", 2 * p, 1)]
    elif zero_stage == 1:
        parts = [_collective(dims, g, "all-reduce of bf16 gradients", "data", "all-reduce", 2 * p, 1),
                 _collective(dims, g, "all-gather of updated bf16 parameters", "data", "all-gather", 2 * p, 1)]
    else:
        raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage}")
    tp_leaving = leaving_node(dims.axis_partitions("tp"), tp_bytes, g)
    return GroupTraffic(tp_all_reduces=count, tp_message_bytes=message, tp_bytes_per_gpu=tp_bytes,
                        collectives=parts, leaving_node_bytes=tp_leaving + sum(c["leaving_node"] for c in parts),
                        gpus_per_node=g)
