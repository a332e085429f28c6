"""Rank program: process-group membership, both exchange routes against a reference all-gather
for every wire format, bytes against the plan formula, and the data streams' sharing rules.
Args: OUT K."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codistill_ds.config import DataConfig
from codistill_ds.data.corpus import build_corpus
from codistill_ds.data.streams import ExchangeStream, TrainStream
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.distributed.topology import world_topology
from codistill_ds.exchange.sampling import sample_targets
from codistill_ds.exchange.transport.world import LogitExchange
from codistill_ds.exchange.wire import CompressedLogits, compress, pack, wire_dtype
from codistill_ds.plan.bytes import make_plan


def members(pg) -> list[int]:
    """Global ranks of a process group, asked of the group itself (all-gather of ranks)."""
    if pg is None:
        return []
    out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(out, torch.tensor([dist.get_rank()]), group=pg)
    return [int(t) for t in out]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


FORMATS = {  # name: (value dtype, index dtype, topk; 0 = full vocabulary, None = 4 samples)
    "bf16-int32-top8": ("bf16", "int32", 8), "bf16-uint16-top8": ("bf16", "uint16", 8),
    "fp16-uint16-top8": ("fp16", "uint16", 8), "fp32-int32-top8": ("fp32", "int32", 8),
    "fp8-uint16-top8": ("fp8", "uint16", 8), "fp8-int32-top8": ("fp8", "int32", 8),
    "fp8-uint16-top1": ("fp8", "uint16", 1), "bf16-uint16-top1": ("bf16", "uint16", 1),
    "bf16-full": ("bf16", "auto", 0), "fp8-full": ("fp8", "auto", 0),
    "samples-bf16-uint16": ("bf16", "uint16", None),
}


def same_content(a: CompressedLogits, b: CompressedLogits) -> bool:
    bits = lambda t: t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)
    ids = (a.indices is None and b.indices is None) or torch.equal(a.indices, b.indices)
    return a.values.dtype == b.values.dtype and torch.equal(bits(a.values), bits(b.values)) and ids


def check_formats(top, logits: torch.Tensor) -> dict:
    """Every wire format through both routes: the peers' payloads equal a world all-gather's,
    and the bytes each rank counts equal the format's own size and the plan's formula."""
    n_tokens, V = logits.shape
    out = {}
    for name, (dtype, index, topk) in FORMATS.items():
        if topk is None:
            local = sample_targets(logits, 4, 2.0, dtype, index, torch.Generator().manual_seed(top.rank))
        else:
            local = compress(logits, topk, wire_dtype(dtype), "logprobs", 2.0, index)
        fmt = local.wire_format()
        buf = pack(local)
        world = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
        dist.all_gather(world, buf)
        ref = [fmt.unpack(world[p], n_tokens) for p in top.dims.rail_ranks(top.position)
               if p != top.rank]
        row = {"k": fmt.k, "value_dtype": fmt.value_dtype, "index_dtype": fmt.index_dtype,
               "payload": fmt.payload_bytes(n_tokens), "packed": buf.numel()}
        for route in ("leaders", "rails"):
            ex = LogitExchange(top, route)
            res = ex.exchange(local)
            row[f"{route}_equal"] = all(same_content(p, r) for p, r in zip(res.peers, ref))
            row[f"{route}_npeers"] = len(res.peers)
            row[f"{route}_bytes"] = ex.bytes_sent
        plan = make_plan(params=1000, vocab=V, seq_len=5, batch=3 * top.group_size,
                         topk=fmt.k if topk is None else topk, interval=1, groups=top.groups,
                         world=dist.get_world_size(), dtype=dtype, index_dtype=index)
        row["plan_exchange_bytes"] = plan.exchange_bytes_per_exchange
        out[name] = row
    return out


def check_to_owners(top) -> dict:
    """exchange_batch "train": my predictions cover my peers' batches (one 15-row chunk per peer,
    group order) and each chunk reaches only its owner. The chunk group g computes for group h at
    rail slot r is a pure function of (g, h, r), so the receiver knows what it must get."""
    K, me = top.groups, top.group_id

    def chunk(sender: int, owner: int) -> CompressedLogits:
        gen = torch.Generator().manual_seed(10_000 * sender + 100 * owner + top.position)
        return compress(torch.randn(15, 300, generator=gen) * 3, 8, wire_dtype("bf16"), "logprobs", 1.0)

    mine = [chunk(me, h) for h in range(K) if h != me]
    local = CompressedLogits(torch.cat([c.values for c in mine]), torch.cat([c.indices for c in mine]),
                             "logprobs", mine[0].fmt)
    out = {"chunk_bytes": pack(mine[0]).numel()}
    for route in ("leaders", "rails"):
        ex = LogitExchange(top, route, to_owners=True)
        res = ex.exchange(local)
        want = [chunk(g, me) for g in res.peer_groups]
        out[f"{route}_equal"] = res.peer_groups == [g for g in range(K) if g != me] and all(
            same_content(p, w) for p, w in zip(res.peers, want))
        out[f"{route}_bytes"] = ex.bytes_sent
    plan = make_plan(params=1000, vocab=300, seq_len=5, batch=3 * top.group_size, topk=8, interval=1,
                     groups=K, world=dist.get_world_size(), dtype="bf16", index_dtype="auto")
    out["plan_exchange_bytes"] = plan.exchange_bytes_per_exchange
    return out


def main() -> None:
    out, K = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    top = world_topology(K)
    result = {"rank": top.rank, "group": top.group_id, "group_rank": top.position,
              "group_members": members(top.group), "rail_members": members(top.rail),
              "mp_members": members(top.solo)}
    # leaders group: only leaders hold it; build_topology gives None elsewhere
    result["leaders_members"] = members(top.leaders)

    # Random logits whose values differ per rank; tokens per slice = 3 seqs x 5 positions.
    g = torch.Generator().manual_seed(1000 + top.rank)
    result["formats"] = check_formats(top, torch.randn(15, 300, generator=g) * 3)
    result["to_owners"] = check_to_owners(top)

    # Streams on real text: group shards and the shared exchange batch.
    corpus = build_corpus(DataConfig(seq_len=16, max_bytes=200_000, micro_batch_size=2))
    train = TrainStream(corpus, 7, top.group_id, K, top.position, top.group_size, 2, 1)
    ex = ExchangeStream(corpus, 7, 2 * top.group_size, top.position, top.group_size)
    result["train_digests"] = [digest(train.micro_batch(s, 0)) for s in range(5)]
    result["exchange_digests"] = [digest(ex.batch_slice(e)) for e in range(5)]
    result["train_rows"] = [[digest(r) for r in train.micro_batch(s, 0)] for s in range(5)]
    (out / f"rank{top.rank}.json").write_text(json.dumps(result))
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()
