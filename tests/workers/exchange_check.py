"""Rank program: process-group membership, both exchange routes against a reference all-gather,
bytes against the plan formula, and the data streams' sharing rules. Args: OUT K [topk]."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codistill_ds.compression import compress, pack, payload_bytes
from codistill_ds.config import DataConfig
from codistill_ds.data import ExchangeStream, TrainStream, build_corpus
from codistill_ds.dist import exit_process, shutdown
from codistill_ds.exchange import LogitExchange
from codistill_ds.plan import make_plan
from codistill_ds.topology import build_topology


def members(pg) -> list[int]:
    """Global ranks of a process group, asked of the group itself (all-gather of ranks)."""
    if pg is None:
        return []
    out = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(out, torch.tensor([dist.get_rank()]), group=pg)
    return [int(t) for t in out]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def main() -> None:
    out, K = Path(sys.argv[1]), int(sys.argv[2])
    topk = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    dist.init_process_group("gloo")
    top = build_topology(K)
    result = {"rank": top.rank, "group": top.group_id, "group_rank": top.group_rank,
              "group_members": members(top.group), "rail_members": members(top.rail),
              "mp_members": members(top.model_parallel)}
    # leaders group: only leaders hold it; build_topology gives None elsewhere
    result["leaders_members"] = members(top.leaders)

    # Random logits whose values differ per rank; tokens per slice = 3 seqs x 5 positions.
    V, n_tokens = 50, 15
    g = torch.Generator().manual_seed(1000 + top.rank)
    logits = torch.randn(n_tokens, V, generator=g) * 3
    local = compress(logits, topk, torch.bfloat16, "logprobs", 2.0)
    # Reference: all-gather every rank's buffer over the WORLD, pick my rail peers' slices.
    buf = pack(local)
    world = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(world, buf)
    ref = [world[p] for p in top.layout.rail_ranks(top.group_rank) if p != top.rank]
    for route in ("leaders", "rails"):
        ex = LogitExchange(top, route)
        res = ex.exchange(local)
        result[f"{route}_equal"] = all(torch.equal(pack(p), r) for p, r in zip(res.peers, ref))
        result[f"{route}_npeers"] = len(res.peers)
        result[f"{route}_bytes"] = ex.bytes_sent
    full = topk == 0 or topk >= V
    result["payload"] = payload_bytes(n_tokens, V if full else topk, torch.bfloat16, full)
    plan = make_plan(params=1000, vocab=V, seq_len=5, batch=3 * top.group_size, topk=topk,
                     interval=1, groups=K, world=dist.get_world_size(), dtype="bf16")
    result["plan_exchange_bytes"] = plan.exchange_bytes_per_exchange

    # Streams on real text: group shards and the shared exchange batch.
    corpus = build_corpus(DataConfig(seq_len=16, max_bytes=200_000, micro_batch_size=2))
    train = TrainStream(corpus, 7, top.group_id, K, top.group_rank, top.group_size, 2, 1)
    ex = ExchangeStream(corpus, 7, 2 * top.group_size, top.group_rank, top.group_size)
    result["train_digests"] = [digest(train.micro_batch(s, 0)) for s in range(5)]
    result["exchange_digests"] = [digest(ex.batch_slice(e)) for e in range(5)]
    result["train_rows"] = [[digest(r) for r in train.micro_batch(s, 0)] for s in range(5)]
    (out / f"rank{top.rank}.json").write_text(json.dumps(result))
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()
