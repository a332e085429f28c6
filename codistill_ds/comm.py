"""Collectives with their tensors on the right device: the one module that calls them.

NCCL reduces CUDA tensors only, gloo CPU tensors (and CUDA ones through a staging copy in some
ops only). Bookkeeping in this library (agreement counts, loss means, NaN flags, validation
sums) is a handful of numbers computed on the CPU; payloads (exchanged predictions, weight
shards) live wherever the model put them. Every collective therefore goes through a function
here that asks the process group which device it serves and moves the tensor there and back.

Why not only `init_process_group("cpu:gloo,cuda:nccl")`: that is what `dist.init_distributed`
does on GPU machines (CPU bookkeeping then travels over gloo on every group that inherits the
default backends), but process groups built with one backend (the cross-group exchange over
`codistill.exchange_backend: nccl`, DeepSpeed's or Accelerate's own groups, a torchft group)
still serve one device only. Asking the group covers all of them; a test checks that no other
module calls a `torch.distributed` collective directly (tests/test_comm.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def group_device(group: Any = None) -> torch.device:
    """The device a tensor must be on for a collective over `group`.

    CPU whenever the group has a gloo backend (alone or next to NCCL); the current CUDA device
    for an NCCL-only group. Groups that c10d does not know by name (torchft's reconfigurable
    gloo groups) are CPU groups."""
    try:
        backend = str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError, AttributeError):
        return torch.device("cpu")
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _on(tensor: torch.Tensor, group: Any) -> tuple[torch.Tensor, bool]:
    """`tensor` moved to the group's device, and whether it moved (so the result moves back)."""
    dev = group_device(group)
    if tensor.device == dev:
        return tensor, False
    return tensor.to(dev), True


def all_reduce(tensor: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group`, whatever device the tensor is on."""
    moved, copied = _on(tensor, group)
    dist.all_reduce(moved, op=op, group=group)
    if copied:
        tensor.copy_(moved)
    return tensor


def reduce_numbers(values: Sequence[float], group: Any = None, op: Any = ReduceOp.SUM) -> list[float]:
    """Bookkeeping: reduce a few Python numbers over `group` in float64 (exact for counts)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce(t, op=op, group=group)
    return [float(v) for v in t.tolist()]


def all_gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's `tensor` (equal shapes), in group-rank order, on the input's device."""
    moved, copied = _on(tensor.contiguous(), group)
    out = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, moved, group=group)
    return [o.to(tensor.device) for o in out] if copied else out


def gather(tensor: torch.Tensor, dst: int, group: Any = None) -> list[torch.Tensor] | None:
    """Every rank's `tensor` on global rank `dst` (None elsewhere), in group-rank order."""
    moved, copied = _on(tensor.contiguous(), group)
    out = None
    if dist.get_rank() == dst:
        out = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.gather(moved, out, dst=dst, group=group)
    if out is not None and copied:
        out = [o.to(tensor.device) for o in out]
    return out


def scatter(out: torch.Tensor, parts: list[torch.Tensor] | None, src: int, group: Any = None) -> torch.Tensor:
    """Rank i of `group` receives `parts[i]` from global rank `src` into `out`."""
    moved, copied = _on(out, group)
    dev = moved.device
    if parts is not None:
        parts = [p.to(dev).contiguous() for p in parts]
    dist.scatter(moved, parts, src=src, group=group)
    if copied:
        out.copy_(moved)
    return out


def broadcast(tensor: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
    """In-place broadcast from global rank `src` over `group`."""
    moved, copied = _on(tensor, group)
    dist.broadcast(moved, src=src, group=group)
    if copied:
        tensor.copy_(moved)
    return tensor


def barrier(group: Any = None) -> None:
    dist.barrier(group=group)


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Picklable objects from every rank of `group` (start-up handshakes, end-of-run tables)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int, group: Any = None) -> Any:
    """`obj` of global rank `src` on every rank of `group`."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
