"""Collectives with their tensors on the right device: the one module that calls them.

NCCL reduces CUDA tensors only, gloo CPU tensors (and CUDA ones through a staging copy in some
ops only). Bookkeeping in this library (agreement counts, loss means, NaN flags, validation
sums) is a handful of numbers computed on the CPU; payloads (exchanged predictions, weight
shards) live wherever the model put them. Every collective therefore goes through a function
here that asks the process group which devices it serves and, only when the tensor's device is
not one of them, moves the tensor there and back.

Why not only `init_process_group("cpu:gloo,cuda:nccl")`: that is what `dist.init_distributed`
does on GPU machines (CPU bookkeeping then travels over gloo and CUDA payloads over NCCL on every
group that inherits the default backends), but process groups built with one backend (the
cross-group exchange over `codistill.exchange_backend: nccl` or `gloo`, DeepSpeed's or
Accelerate's own groups, a torchft group) still serve one device only. Asking the group covers
all of them; tests/unit/test_comm.py fails when another module calls a `torch.distributed`
collective directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp

_DEVICE_OF_BACKEND = {"gloo": "cpu", "nccl": "cuda", "mpi": "cpu", "ucc": "cuda", "xccl": "xpu"}


def served_device_types(backend: str) -> set[str]:
    """Device types a process group with this backend string carries tensors of.

    "gloo" -> {cpu}; "nccl" -> {cuda}; "cpu:gloo,cuda:nccl" -> {cpu, cuda}. Gloo can stage some
    CUDA ops through host memory, but not all of them, so it counts as CPU only."""
    types = set()
    for part in str(backend).lower().split(","):
        device, _, name = part.strip().rpartition(":")
        types.add(device or _DEVICE_OF_BACKEND.get(name, "cpu"))
    return types


def _backend(group: Any) -> str | None:
    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError, AttributeError):
        return None  # not a c10d group by name: torchft's reconfigurable gloo groups


def target_device(tensor_device: torch.device, backend: str | None, cuda_available: bool) -> torch.device:
    """Where a tensor on `tensor_device` must be for a collective over a group with `backend`.

    Pure, so the choice is testable on a machine without CUDA: the tensor stays where it is if
    the group serves its device type; otherwise it goes to the CPU (any gloo part, or no CUDA)
    or to the current CUDA device (an NCCL-only group)."""
    served = {"cpu"} if backend is None else served_device_types(backend)
    if tensor_device.type in served:
        return tensor_device
    if "cpu" in served or not cuda_available:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_exchange_backend(choice: str, cuda_available: bool) -> str:
    """`codistill.exchange_backend` as a c10d backend name: "auto" is nccl on CUDA, gloo on CPU."""
    if choice == "auto":
        return "nccl" if cuda_available else "gloo"
    return choice


def group_device(group: Any = None) -> torch.device:
    """The device for new tensors of a collective over `group`: CPU whenever the group has a
    gloo backend (alone or next to NCCL) or no CUDA exists; the current CUDA device for an
    NCCL-only group. Groups that c10d does not know by name are CPU groups."""
    return target_device(torch.device("meta"), _backend(group), torch.cuda.is_available())


def _on(tensor: torch.Tensor, group: Any) -> tuple[torch.Tensor, bool]:
    """`tensor` on a device the group serves, and whether it moved (so the result moves back)."""
    dev = target_device(tensor.device, _backend(group), torch.cuda.is_available())
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


def all_to_all(parts: list[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """Rank i of `group` gets `parts[i]` from me; returns what each rank sent me, in group-rank
    order. 1-D tensors of one dtype; the sizes may differ (my own part may be empty), but each
    rank must send me as many elements as I send it (true of the exchange's symmetric payloads)."""
    flat = torch.cat([p.reshape(-1) for p in parts])
    moved, copied = _on(flat, group)
    sizes = [int(p.numel()) for p in parts]
    out = torch.empty_like(moved)
    dist.all_to_all_single(out, moved, output_split_sizes=sizes, input_split_sizes=sizes, group=group)
    if copied:
        out = out.to(flat.device)
    return list(out.split(sizes))


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
    """A barrier that names its GPU on NCCL-only groups (NCCL otherwise guesses one per rank
    and warns that the guess can hang)."""
    dev = group_device(group)
    if dev.type == "cuda":
        dist.barrier(group=group, device_ids=[dev.index])
    else:
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


def group_mean(value: torch.Tensor | float, group: Any) -> float:
    """Mean of one number over the ranks of `group`, in float64 (every member calls it)."""
    v = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(1).clone()
    all_reduce(v, group=group)
    return (v / dist.get_world_size(group)).item()
