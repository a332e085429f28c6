"""The exchange and the distillation losses on tensor-parallel vocabulary slices, exact.

With tensor parallelism of degree T inside a group, the vocabulary-parallel `lm_head` leaves TP
rank t with the logits of a contiguous vocabulary slice, [N, V_t] of [N, V]. Everything the
codistillation exchange computes from logits is a per-token reduction over the vocabulary, so it
can be computed from the slices with a few per-token collectives over the TP group, never
gathering the [N, V] logits (DESIGN.md "Model parallelism inside a group"):

- log-sum-exp: an all-reduce of the per-slice max, then of the sums of exp(z - max);
- teacher top-k: each slice's top-min(k, V_t) with global ids (every global top-k entry is in its
  slice's top-k), an all-gather of those T x min(k, V_t) candidates, one re-selection;
- student: log q at the teacher's ids is a sum over tp of an owner-masked gather; the tail bucket
  a sum over tp of exp(z - max) with those ids masked out; each sum is an all-reduce in forward
  and the identity in backward (Megatron's `_ReduceFromModelParallelRegion`): the loss is then
  the same number on every TP rank, and rank t's backward gives d loss / d (its slice), exactly
  the slice of the full-vocabulary gradient. kl / reverse_kl / jsd, mse, sampled targets and
  full-vocabulary targets reuse the summands of `losses.py`;
- cross-entropy is the same primitive with the label as the only id; argmax is a local argmax and
  an all-gather (ties go to the lowest global id, like torch.argmax).

Exactness against the unsharded code (`compression.compress`, `sampling.sample_targets`,
`losses.*` on the gathered logits), what the tests check:
- top-k ids: identical on tie-free logits. Ties are broken by the lowest global id (the order a
  stable sort gives). torch.topk's order among equal values is unspecified (its CPU kernel picks
  e.g. [8, 6, 7] of ten zeros), so with ties the ids may differ from the unsharded ones, but only
  among entries of equal value: the values, column by column, are the same. This rule does not
  depend on T; `compress` with group None (T = 1) applies it too, so runs with T = 1 and T > 1
  give the same payload bit for bit when both use this module.
- values: "logits" and full-vocabulary payloads bit-identical (the full vocabulary is gathered and
  handed to `compression.compress`); "logprobs" top-k differ from `compress` only by the order of
  the log-sum-exp's float32 additions (a few ulps before the wire rounding, mostly none after).
- samples: drawn by inverse CDF from the slices (float64 cumulative sums, one prefix per slice)
  with uniforms from `generator`, taken from TP rank 0 so the T ranks hold the same payload even
  if their generators differ. It is NOT the draw `sampling.sample_targets` makes with the same
  generator: torch.multinomial consumes the generator in its own, device-specific way and
  accumulates its CDF sequentially in float32 over the whole row, which no slice can reproduce.
  The draw is exact in distribution (each id with probability p_i up to float64 rounding of the
  cumulative sums), and the same ids for every T given the same generator (up to a uniform that
  lands within float64 rounding of a CDF boundary), including T = 1 through this module.
- losses and gradients: the same formulas on the same numbers, summed in another order: equal to
  about 1e-7 relative in float32.

A local slice reaching code that expects the whole vocabulary computes a wrong number without any
error (a softmax over V/T entries is a softmax). Three things prevent it: slices live in
`VocabSlice` (not a tensor), whose local tensor is tagged, and `compression.compress`,
`sampling.sample_targets` and every `losses.py` entry point refuse a VocabSlice, a tagged tensor
and a DTensor sharded along its last dimension; every payload made here or by `compress` carries
the vocabulary its ids index (`WireFormat.vocab`), and `losses.py` refuses a student of another
width, which is what catches an untagged [N, V/T] tensor with k < V/T, where no shape check can.

Collectives over tp per call (N tokens, V_t = V/T, all per-token and small except the first):
compress full vocabulary: one all-gather of [N, V_t] (`compress_rows`: one all-to-all of
[N/T, V_t] blocks instead); compress top-k: one all-gather of N x min(k, V_t) int64 candidates,
plus one [N] all-reduce for "logprobs" (the max is the top candidate); sample_targets: two [N]
all-reduces, an all-gather of [N] totals and of the [N, n] uniforms, one [N, n, 2] all-reduce;
gather_rows: one all-gather of the packed chunk; student losses: two [N] all-reduces for the
log-sum-exp, then per peer one all-reduce ([N, k+1] top-k, [N, n] samples, [N] full vocabulary,
which adds two [N] for the teacher's normalizer); cross_entropy: three; argmax: one [N, 2]
all-gather; VocabSlice without `bounds`: one all-gather of four numbers.

Every function takes the TP group as an argument (via `VocabSlice.group` for the student and
teacher sides): a `torch.distributed` process group (collectives through `codistill_ds.comm`),
None for T = 1 (no collective), or any `TPComm` (tests simulate T ranks with threads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from . import comm as _comm
from .compression import (
    CompressedLogits,
    WireFormat,
    _dtype_name,
    choose_index_dtype,
    pack,
    to_wire_values,
)
from .compression import compress as _compress_whole
from .losses import (
    _check_kind,
    _check_target,
    _divergence_terms,
    _masked_mean,
    _mse_at,
    _sampled_kl_at,
    _teacher_log_probs,
)

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


# --------------------------------------------------------------------------- teacher side

def _order_keys(z: torch.Tensor, first_id: int) -> torch.Tensor:
    """int64 keys of float32 z [n, w] (ids first_id ..) whose descending order is value
    descending, then id ascending; NaN above everything (as torch.topk), -0 equal to +0."""
    z = torch.where(torch.isnan(z), torch.full_like(z, float("nan")), z) + 0.0
    bits = z.contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    ids = torch.arange(first_id, first_id + z.shape[-1], device=z.device, dtype=torch.int64)
    return ordered * (1 << 32) + (0xFFFFFFFF - ids)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, int64 ids) from `_order_keys`' keys."""
    low = keys & 0xFFFFFFFF
    ordered = (keys - low) // (1 << 32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(torch.int32).view(torch.float32), 0xFFFFFFFF - low


def _top_keys(z: torch.Tensor, first_id: int, k: int) -> torch.Tensor:
    """The k largest keys of each row of z, built a block of rows at a time."""
    step = max(1, _ROW_BLOCK // max(1, z.shape[1]))
    out = [_order_keys(z[i:i + step], first_id).topk(k, dim=-1, sorted=False).values
           for i in range(0, z.shape[0], step)]
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.int64, device=z.device)


def global_topk(vs: VocabSlice, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [N, k], int64 global ids [N, k]) of the k largest logits over the whole
    vocabulary, sorted descending, ties to the lowest id; the same on every TP rank.

    Each slice's top-min(k, V_t) holds every global top-k entry of that slice (same total order),
    so re-selecting among the T x min(k, V_t) gathered candidates (one int64 each: value bits and
    id) is exact."""
    if not 1 <= k <= vs.vocab:
        raise ValueError(f"k must be in [1, {vs.vocab}], got {k}")
    with torch.no_grad():
        z = vs.local.detach().float()
        cand = _top_keys(z, vs.offset, min(k, vs.width))
        if vs.comm.size > 1:
            cand = torch.cat(vs.comm.all_gather(cand.contiguous()), dim=-1)
        return _decode_keys(cand.topk(k, dim=-1, sorted=True).values)


def compress(vs: VocabSlice, topk: int, dtype: torch.dtype, kind: str, temperature: float,
             index_dtype: str = "auto") -> CompressedLogits:
    """`compression.compress` of the whole logits, from the slices: the same payload on every TP
    rank (see the module notes for what is bit-identical). Full vocabulary (topk 0 or >= V)
    gathers the [N, V] logits and calls `compression.compress` on them; `compress_rows` gives a
    rank only its rows without that gather."""
    if kind not in ("logprobs", "logits"):
        raise ValueError(f"kind must be 'logprobs' or 'logits', got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    fmt = WireFormat.choose(topk, vs.vocab, _dtype_name(dtype), index_dtype, kind)
    if fmt.full_vocab:
        return _compress_whole(gather_logits(vs), topk, dtype, kind, temperature, index_dtype)
    top, ids = global_topk(vs, fmt.k)
    with torch.no_grad():
        if kind == "logprobs":
            # The global max is the top-1 candidate (max(z / T) = max(z) / T exactly, since
            # rounding is monotone): one all-reduce, not two.
            _, lse = _logsumexp(vs.local.detach().float() / temperature, vs.comm,
                                top[:, :1] / temperature)
            top = top / temperature - lse
        return CompressedLogits(to_wire_values(top, fmt.value_dtype),
                                ids.to(torch.int32).contiguous(), kind, fmt)


def sample_targets(vs: VocabSlice, num_samples: int, temperature: float, value_dtype: str = "bf16",
                   index_dtype: str = "auto",
                   generator: torch.Generator | None = None) -> CompressedLogits:
    """`num_samples` ids per token drawn from softmax(logits / T) over the whole vocabulary, with
    replacement, and their log-probabilities (kind "samples"), from the slices.

    Inverse CDF: uniforms u [N, n] (float64, from `generator`, TP rank 0's copy used by all);
    x = u * sum_i w_i with w_i = exp(z_i / T - max); the slice whose float64 cumulative range
    holds x finds the id by binary search; one all-reduce gives every rank the ids and z / T at
    them. Same distribution as `sampling.sample_targets`, not the same ids (module notes); the
    same ids for every T given the same generator. Every rank's generator advances equally."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    comm, dev = vs.comm, vs.local.device
    fmt = WireFormat(num_samples, value_dtype, choose_index_dtype(index_dtype, vs.vocab),
                     "samples", vs.vocab)
    n = vs.num_tokens()
    with torch.no_grad():
        zt = vs.local.detach().float() / temperature
        m, lse = _logsumexp(zt, comm)
        cum = torch.exp(zt.double() - m.double()).cumsum(dim=-1)  # [N, V_t] float64
        totals = torch.stack(comm.all_gather(cum[:, -1].contiguous()))  # [T, N]
        prefix = [torch.zeros(n, dtype=torch.float64, device=dev)]
        for t in range(comm.size):  # one fixed order of additions, the same on every rank
            prefix.append(prefix[-1] + totals[t].to(dev))
        start, stop, total = (prefix[comm.rank][:, None], prefix[comm.rank + 1][:, None],
                              prefix[-1][:, None])
        cum += start  # my slice's cumulative range; its last entry is exactly `stop`
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(n, num_samples, dtype=torch.float64, generator=generator, device=gen_dev)
        u = comm.all_gather(u)[0].to(dev)
        x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        owner = (x >= start) & (x < stop)
        j = torch.searchsorted(cum, x.contiguous(), right=True).clamp_max(vs.width - 1)
        mine = torch.stack([torch.where(owner, (j + vs.offset).double(), 0.0),
                            torch.where(owner, zt.gather(-1, j).double(), 0.0)], dim=-1)
        both = comm.all_reduce(mine, "sum")  # exactly one owner per draw: exact sums
        ids, zt_ids = both[..., 0].long(), both[..., 1].float()
        values = to_wire_values(zt_ids - lse, value_dtype)
    return CompressedLogits(values, ids.to(torch.int32).contiguous(), "samples", fmt)


# --------------------------------------------------------------------------- row split

def row_range(num_tokens: int, rank: int, size: int) -> range:
    """Rows of TP rank `rank`'s chunk: torch.tensor_split's cut (the first N mod T chunks one
    row longer), so the chunks' wire bytes add up to exactly the whole payload's."""
    if not 0 <= rank < size or num_tokens < 0:
        raise ValueError(f"need 0 <= rank < size and num_tokens >= 0, got {rank}, {size}, {num_tokens}")
    base, extra = divmod(num_tokens, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def rows_chunk(payload: CompressedLogits, rank: int, size: int) -> CompressedLogits:
    """TP rank `rank`'s rows of a payload every TP rank holds: what that rank sends across
    groups, so the cross-group bytes of the T ranks add up to the T = 1 payload's."""
    r = row_range(payload.num_tokens(), rank, size)
    return payload.rows(r.start, r.stop)


def gather_rows(chunk: CompressedLogits, num_tokens: int, group: Any) -> CompressedLogits:
    """The whole payload from each TP rank's rows chunk (`rows_chunk`'s inverse, after the
    swap): one all-gather over tp of the packed chunks, bit-exact (fp8 included)."""
    comm = tp_comm(group)
    mine = row_range(num_tokens, comm.rank, comm.size)
    if chunk.num_tokens() != len(mine):
        raise ValueError(f"TP rank {comm.rank} holds {chunk.num_tokens()} rows, its chunk of "
                         f"{num_tokens} has {len(mine)}")
    if comm.size == 1:
        return chunk
    fmt = chunk.wire_format()
    width = fmt.payload_bytes(len(row_range(num_tokens, 0, comm.size)))
    buf = pack(chunk)
    buf = torch.cat([buf, buf.new_zeros(width - buf.numel())])
    parts = []
    for r, got in enumerate(comm.all_gather(buf)):
        rows = len(row_range(num_tokens, r, comm.size))
        parts.append(fmt.unpack(got[:fmt.payload_bytes(rows)].contiguous(), rows))
    values = torch.cat([p.values for p in parts])
    indices = None if chunk.indices is None else torch.cat([p.indices for p in parts])
    return CompressedLogits(values, indices, chunk.kind, chunk.fmt)


def compress_rows(vs: VocabSlice, topk: int, dtype: torch.dtype, kind: str, temperature: float,
                  index_dtype: str = "auto") -> CompressedLogits:
    """`rows_chunk(compress(vs, ...), my rank, T)`, bit for bit. For the full vocabulary, one
    all-to-all hands each rank its rows of every slice ([N/T, V], never [N, V])."""
    comm = vs.comm
    fmt = WireFormat.choose(topk, vs.vocab, _dtype_name(dtype), index_dtype, kind)
    if not fmt.full_vocab or comm.size == 1:
        return rows_chunk(compress(vs, topk, dtype, kind, temperature, index_dtype),
                          comm.rank, comm.size)
    n = vs.num_tokens()
    rows_max, width = len(row_range(n, 0, comm.size)), max(w for _, w in vs.bounds)
    z = vs.local.detach()
    parts = []
    for r in range(comm.size):
        rr = row_range(n, r, comm.size)
        block = torch.nn.functional.pad(z[rr.start:rr.stop], (0, width - vs.width, 0, rows_max - len(rr)))
        parts.append(block.reshape(-1))
    got = comm.all_to_all(parts)
    mine = len(row_range(n, comm.rank, comm.size))
    logits = torch.cat([g.view(rows_max, width)[:mine, :w] for g, (_, w) in zip(got, vs.bounds)], dim=-1)
    return _compress_whole(logits, topk, dtype, kind, temperature, index_dtype)


# --------------------------------------------------------------------------- student side

class _Student:
    """The student's slice at temperature T with its whole-vocabulary log-sum-exp, shared by
    every peer's loss (the all-reduces happen once)."""

    def __init__(self, vs: VocabSlice, temperature: float) -> None:
        self.vs = vs
        self.zt = vs.local.float() / temperature
        self.m, self.lse = _logsumexp(self.zt, vs.comm)

    def log_q_at(self, ids: torch.Tensor) -> torch.Tensor:
        """log q at global ids [N, m] (repeats allowed)."""
        return _at_ids(self.zt, self.vs, ids) - self.lse

    def log_q_slice(self) -> torch.Tensor:
        """log q over my slice, to be reduced into per-rank partial sums (see
        `_IntoPartialSums`: the log-sum-exp's gradient is summed over tp)."""
        return self.zt - _into_partial_sums(self.lse, self.vs.comm)

    def buckets(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, k+1]: log q at the k distinct ids, then the log of the rest's mass (a sum of
        exp(z - max) over the entries not sent, never 1 - sum: exact for a 1e-12 tail)."""
        vs = self.vs
        loc, owned = _owned(vs, ids)
        sent = torch.zeros(vs.num_tokens(), vs.width + 1, dtype=torch.bool, device=loc.device)
        sent.scatter_(-1, torch.where(owned, loc, torch.full_like(loc, vs.width)), True)
        rest = self.zt.masked_fill(sent[:, :vs.width], float("-inf"))
        got = self.zt.gather(-1, loc)
        # One all-reduce for both sums: z / T at the ids (owner-masked) and the rest's mass.
        both = _sum_over_tp(torch.cat([torch.where(owned, got, torch.zeros_like(got)),
                                       torch.exp(rest - self.m).sum(dim=-1, keepdim=True)], -1), vs.comm)
        z_ids, tail = both[:, :-1], both[:, -1:]
        return torch.cat([z_ids - self.lse, torch.log(tail) + self.m - self.lse], dim=-1)


def _teacher_slice_log_probs(target: CompressedLogits, vs: VocabSlice) -> torch.Tensor:
    """My columns of log_softmax(values) for a full-vocabulary target (constants)."""
    with torch.no_grad():
        v = _vocab_columns(target.values, vs).detach().float()
        return v - _logsumexp(v, vs.comm)[1]


def _per_token(vs: VocabSlice, st: _Student | None, target: CompressedLogits, loss: str,
               temperature: float) -> torch.Tensor:
    """Per-token loss [N], the same number on every TP rank (`losses._per_token_loss`)."""
    comm = vs.comm
    if loss == "mse":
        s = vs.local.float()
        if target.indices is None:
            z = _vocab_columns(target.values, vs).detach().float()
            return _sum_over_tp((s - z).pow(2).sum(dim=-1), comm) / vs.vocab
        return _mse_at(_at_ids(s, vs, target.indices), target)
    assert st is not None
    if target.kind == "samples":
        return _sampled_kl_at(st.log_q_at(target.indices), target, temperature)
    if target.indices is None:
        terms = _divergence_terms(_teacher_slice_log_probs(target, vs), st.log_q_slice(), loss)
        return _sum_over_tp(terms, comm) * (temperature * temperature)
    terms = _divergence_terms(_teacher_log_probs(target), st.buckets(target.indices), loss)
    return terms * (temperature * temperature)


def _check_student(vs: Any, what: str) -> None:
    if not isinstance(vs, VocabSlice):
        raise TypeError(f"vocab_parallel.{what} takes a VocabSlice, got {type(vs).__name__}; "
                        "whole-vocabulary logits go to codistill_ds.losses")


def distill_loss(vs: VocabSlice, target: CompressedLogits, loss: str, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """`losses.distill_loss` of the whole logits, from my slice: the same scalar on every TP
    rank; its gradient reaches `vs.local` as the slice of the whole-vocabulary gradient."""
    return peer_distill_loss(vs, [target], loss, temperature, mask)


def peer_distill_loss(vs: VocabSlice, targets: Sequence[CompressedLogits], loss: str,
                      temperature: float, mask: torch.Tensor | None = None,
                      weights: Sequence[float] | None = None) -> torch.Tensor:
    """`losses.peer_distill_loss` from my slice (one log-sum-exp shared by the peers)."""
    _check_student(vs, "peer_distill_loss")
    if not targets:
        raise ValueError("peer_distill_loss needs at least one peer target")
    if weights is not None and (len(weights) != len(targets) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"need one weight >= 0 per target, not all 0; got {weights} for {len(targets)} targets")
    for target in targets:
        _check_kind(loss, target)
        _check_target(vs.num_tokens(), vs.vocab, target, temperature, mask)
    st = None if loss == "mse" else _Student(vs, temperature)
    terms = [_masked_mean(_per_token(vs, st, target, loss, temperature), mask) for target in targets]
    if weights is None:
        return torch.stack(terms).sum() / len(terms)
    w = torch.tensor(list(weights), dtype=torch.float32, device=vs.local.device)
    return (torch.stack(terms) * w).sum() / w.sum()


def cross_entropy(vs: VocabSlice, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy(whole_logits.float(), labels, ignore_index=..., reduction=...)` from my
    slice: lse - z[label], the label's logit an owner-masked gather. "mean" divides by the
    labels that count (NaN when none does, as torch); "none" gives 0 at ignored positions."""
    _check_student(vs, "cross_entropy")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    labels = labels.to(vs.local.device).long()
    if labels.shape != (vs.num_tokens(),):
        raise ValueError(f"labels must be ({vs.num_tokens()},), got {tuple(labels.shape)}")
    valid = labels != ignore_index
    if not bool(((labels >= 0) & (labels < vs.vocab) | ~valid).all()):
        raise ValueError(f"labels outside [0, {vs.vocab}) that are not ignore_index={ignore_index}")
    st = _Student(vs, 1.0)
    picked = st.log_q_at(torch.where(valid, labels, torch.zeros_like(labels))[:, None])[:, 0]
    per_token = torch.where(valid, -picked, torch.zeros_like(picked))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().to(per_token.dtype)


def argmax(vs: VocabSlice) -> torch.Tensor:
    """Global argmax [N] int64 of the whole logits: ties (and NaN, the largest as in torch) go
    to the lowest global id, like torch.argmax. A local argmax, then one all-gather."""
    _check_student(vs, "argmax")
    with torch.no_grad():
        z = vs.local.detach()
        li = z.argmax(dim=-1)
        mine = torch.stack([z.gather(-1, li[:, None])[:, 0].double(), (li + vs.offset).double()], -1)
        if vs.comm.size == 1:
            return mine[:, 1].long()
        both = torch.stack(vs.comm.all_gather(mine))  # [T, N, 2]
        vals, ids = both[..., 0], both[..., 1]
        nan = torch.isnan(vals)
        best = torch.where(nan.any(dim=0), nan, vals == vals.max(dim=0).values)
        return torch.where(best, ids, torch.full_like(ids, float("inf"))).min(dim=0).values.long()


def top1_agreement(vs: VocabSlice, target: CompressedLogits,
                   mask: torch.Tensor | None = None) -> tuple[int, int]:
    """`losses.top1_agreement` from my slice: (agreeing, counted), the same on every TP rank (so
    count them over one rank per TP group when summing over a group)."""
    _check_student(vs, "top1_agreement")
    if target.num_tokens() != vs.num_tokens():
        raise ValueError(f"student has {vs.num_tokens()} tokens, target {target.num_tokens()}")
    if target.fmt is not None and target.fmt.vocab not in (None, vs.vocab):
        raise ValueError(f"the target indexes a vocabulary of {target.fmt.vocab}, the student {vs.vocab}")
    with torch.no_grad():
        agree = argmax(vs) == target.top1().to(vs.local.device)
        if mask is not None:
            agree = agree & mask.to(agree.device)
            counted = int(mask.sum().item())
        else:
            counted = int(agree.numel())
        return int(agree.sum().item()), counted
