"""The teacher side on vocabulary slices: exact top-k, log-sum-exp, sampled targets, and the row
split that makes each TP rank send a distinct 1/T of the payload (package docstring)."""

from __future__ import annotations

from typing import Any

import torch

from codistill_ds.exchange.vocab.slice import (
    _ROW_BLOCK,
    VocabSlice,
    _logsumexp,
    gather_logits,
    tp_comm,
)
from codistill_ds.exchange.wire import (
    CompressedLogits,
    WireFormat,
    _dtype_name,
    choose_index_dtype,
    pack,
    to_wire_values,
)
from codistill_ds.exchange.wire import compress as _compress_whole

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


