"""A rank's slice of the vocabulary (`VocabSlice`) and the collectives over the TP group that
turn per-slice sums into whole-vocabulary ones, with the backward each needs (package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from codistill_ds.distributed import comm as _comm

_ROW_BLOCK = 1 << 24
"""Elements of the int64 sort keys built at once by the teacher's top-k (128 MiB)."""


# --------------------------------------------------------------------------- the TP communicator

class TPComm:
    """What the sliced math asks of the tensor-parallel group: its size, my rank in it, and
    collectives in group-rank order. This base class is the group of one (T = 1, no collective);
    `GroupComm` is a torch.distributed group; tests plug in a simulation."""

    size: int = 1
    rank: int = 0

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """op "sum" or "max"; returns the reduced tensor (may be `t`, reduced in place)."""
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (equal shapes), in group-rank order."""
        return [t]

    def all_to_all(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rank i gets parts[i] from me (1-D, one dtype, equal sizes); returns what each sent me."""
        return list(parts)


class GroupComm(TPComm):
    """A torch.distributed process group, through `codistill_ds.comm` (which puts tensors on the
    device the group serves)."""

    _OPS: ClassVar[dict[str, Any]] = {"sum": _comm.ReduceOp.SUM, "max": _comm.ReduceOp.MAX}

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the tensor-parallel group")

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return _comm.all_reduce(t, op=self._OPS[op], group=self.group)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return _comm.all_gather(t, group=self.group)

    def all_to_all(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return _comm.all_to_all(parts, group=self.group)


def tp_comm(group: Any) -> TPComm:
    """None -> the group of one; a TPComm as is; anything else is a torch.distributed group."""
    if group is None:
        return TPComm()
    if isinstance(group, TPComm):
        return group
    return GroupComm(group)


class _SumOverTP(torch.autograd.Function):
    """All-reduce (sum) in forward, identity in backward: the result feeds a loss that every TP
    rank computes identically, so d loss / d (my partial sum) = d loss / d (the sum)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        return comm.all_reduce(x.clone(), "sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _sum_over_tp(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    return x if comm.size == 1 else _SumOverTP.apply(x, comm)


class _IntoPartialSums(torch.autograd.Function):
    """Identity in forward, all-reduce (sum) in backward (Megatron's copy-to-region): for a
    replicated value (the student's log-sum-exp) that enters each rank's partial sum before
    `_sum_over_tp`. Each rank's backward sees only its own partial's dependence on it; the
    loss depends on it through all T partials."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce(grad.clone(), "sum"), None


def _into_partial_sums(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    return x if comm.size == 1 else _IntoPartialSums.apply(x, comm)


# --------------------------------------------------------------------------- the slice type

def chunk_bounds(vocab: int, size: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) of each TP rank's slice as DTensor's Shard(-1) cuts it (torch.chunk:
    ceil(V/T) each, the last one shorter)."""
    c = -(-vocab // size)
    bounds = tuple((min(i * c, vocab), max(0, min(c, vocab - i * c))) for i in range(size))
    if any(w == 0 for _, w in bounds):
        raise ValueError(f"a vocabulary of {vocab} cannot give each of {size} TP ranks a slice")
    return bounds


@dataclass(frozen=True, eq=False)
class VocabSlice:
    """This TP rank's logits over vocabulary entries [offset, offset + width) of `vocab`.

    Not a tensor on purpose: the unsharded code (`compress`, `sample_targets`, `losses.*`) refuses
    it, and refuses its `local` tensor too (tagged here when the slice is not the whole
    vocabulary); the functions of this module take it. `local` keeps its graph: losses computed
    here backpropagate into it.

    `bounds`: every TP rank's (offset, width), in group-rank order; they must tile [0, vocab) in
    rank order. None gathers them over the group once, here (one small all-gather), which also
    checks that every rank agrees on the vocabulary and the token count."""

    local: torch.Tensor
    offset: int
    vocab: int
    group: Any = None
    bounds: tuple[tuple[int, int], ...] | None = None
    comm: TPComm = field(init=False, repr=False)

    _codistill_vocab_slice: ClassVar[bool] = True  # refused by compression.check_whole_vocabulary

    def __post_init__(self) -> None:
        comm = tp_comm(self.group)
        object.__setattr__(self, "comm", comm)
        if self.local.dim() != 2:
            raise ValueError(f"local logits must be [N, V_t], got {tuple(self.local.shape)}")
        n, width = self.local.shape
        if width < 1 or not 0 <= self.offset <= self.vocab - width:
            raise ValueError(f"slice [{self.offset}, {self.offset + width}) is not inside a "
                             f"vocabulary of {self.vocab}")
        bounds = self.bounds
        if bounds is None:
            mine = torch.tensor([self.offset, width, self.vocab, n], dtype=torch.int64)
            rows = [r.tolist() for r in comm.all_gather(mine)]
            if {(r[2], r[3]) for r in rows} != {(self.vocab, n)}:
                raise ValueError(f"TP ranks disagree on (vocab, tokens): {[(r[2], r[3]) for r in rows]}")
            bounds = tuple((r[0], r[1]) for r in rows)
        bounds = tuple((int(o), int(w)) for o, w in bounds)
        if len(bounds) != comm.size or bounds[comm.rank] != (self.offset, width):
            raise ValueError(f"bounds {bounds} do not hold my slice ({self.offset}, {width}) at "
                             f"TP rank {comm.rank} of {comm.size}")
        ends = [0] + [o + w for o, w in bounds]
        if any(o != e or w < 1 for (o, w), e in zip(bounds, ends)) or ends[-1] != self.vocab:
            raise ValueError(f"TP slices {bounds} do not tile [0, {self.vocab}) in rank order")
        object.__setattr__(self, "bounds", bounds)
        if width < self.vocab:
            self.local._codistill_vocab_slice = (self.offset, self.vocab)

    @property
    def width(self) -> int:
        return int(self.local.shape[1])

    def num_tokens(self) -> int:
        return int(self.local.shape[0])

    def rows(self, start: int, stop: int) -> VocabSlice:
        """Tokens [start, stop) of the slice (a view: the gradient reaches `local`)."""
        return VocabSlice(self.local[start:stop], self.offset, self.vocab, self.comm, self.bounds)

    def index_rows(self, index: torch.Tensor) -> VocabSlice:
        """The tokens at `index` (positions under `token_fraction`), with their gradient."""
        return VocabSlice(self.local[index.to(self.local.device)], self.offset, self.vocab, self.comm, self.bounds)

    def detach(self) -> VocabSlice:
        return VocabSlice(self.local.detach(), self.offset, self.vocab, self.comm, self.bounds)

    @classmethod
    def split(cls, logits: torch.Tensor, group: Any = None) -> VocabSlice:
        """My TP rank's chunk of replicated [N, V] logits (tests, references): a view, so the
        gradient reaches `logits`."""
        comm = tp_comm(group)
        bounds = chunk_bounds(logits.shape[-1], comm.size)
        o, w = bounds[comm.rank]
        return cls(logits[:, o:o + w], o, logits.shape[-1], comm, bounds)

    @classmethod
    def from_dtensor(cls, logits: Any) -> VocabSlice:
        """From a DTensor [..., V] sharded (Shard(-1)) along the vocabulary over one mesh
        dimension and replicated over the others (a vocab-parallel `lm_head`'s output). Leading
        dimensions are flattened; the gradient flows back into the DTensor."""
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import (
            compute_local_shape_and_global_offset,
        )

        last = logits.dim() - 1
        dims = [i for i, p in enumerate(logits.placements)
                if type(p) is Shard and p.dim in (last, -1)]
        rest = [p for i, p in enumerate(logits.placements) if i not in dims]
        if len(dims) != 1 or not all(p.is_replicate() for p in rest):
            raise ValueError(f"need logits sharded along the vocabulary over one mesh dimension "
                             f"(Shard(-1)) and replicated elsewhere, got {logits.placements}")
        _, offsets = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh,
                                                           logits.placements)
        group = GroupComm(logits.device_mesh.get_group(dims[0]))
        local = logits.to_local()
        return cls(local.reshape(-1, local.shape[-1]), int(offsets[-1]), int(logits.shape[-1]),
                   group, chunk_bounds(int(logits.shape[-1]), group.size))


def gather_logits(vs: VocabSlice) -> torch.Tensor:
    """The whole [N, V] logits on every TP rank, detached (the full-vocabulary payload, tests)."""
    if vs.comm.size == 1:
        return vs.local.detach()
    width = max(w for _, w in vs.bounds)
    pad = torch.nn.functional.pad(vs.local.detach(), (0, width - vs.width))
    parts = vs.comm.all_gather(pad.contiguous())
    return torch.cat([p[:, :w] for p, (_, w) in zip(parts, vs.bounds)], dim=-1)


def _logsumexp(zt: torch.Tensor, comm: TPComm,
               m: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, log-sum-exp) over the whole vocabulary, [N, 1] each, from my slice zt [N, V_t].

    Two per-token all-reduces: max (unless the caller knows it: `m`), then sum of exp(z - max).
    The max is detached (the value does not depend on it); an infinite max is replaced by 0, as
    torch.logsumexp does."""
    if m is None:
        m = comm.all_reduce(zt.detach().amax(dim=-1, keepdim=True), "max")
    m = torch.where(m.abs() == float("inf"), torch.zeros_like(m), m)
    s = _sum_over_tp(torch.exp(zt - m).sum(dim=-1, keepdim=True), comm)
    return m, torch.log(s) + m


def _owned(vs: VocabSlice, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column of each global id, clamped into the slice; whether my slice owns it)."""
    loc = ids.to(vs.local.device).long() - vs.offset
    owned = (loc >= 0) & (loc < vs.width)
    return torch.where(owned, loc, torch.zeros_like(loc)), owned


def _at_ids(x: torch.Tensor, vs: VocabSlice, ids: torch.Tensor) -> torch.Tensor:
    """x [N, V_t] of my slice at global `ids` [N, m]: sum over tp of the owner-masked gather."""
    loc, owned = _owned(vs, ids)
    got = x.gather(-1, loc)
    return _sum_over_tp(torch.where(owned, got, torch.zeros_like(got)), vs.comm)


def _vocab_columns(values: torch.Tensor, vs: VocabSlice) -> torch.Tensor:
    """My slice's columns of a full-vocabulary payload [N, V]."""
    return values[:, vs.offset:vs.offset + vs.width].to(vs.local.device)


