"""Rank program: weight-exchange teachers hold exactly what the peer sent at the last exchange,
and compute what the peer computed with it. Args: OUT CONFIG [overrides...], or several runs
one after another on the same ranks (`@NAME [overrides...]`..., tests/workers/runs.py),
each writing under OUT/NAME.

Writes OUT/rank{r}.json (digests of the shards sent at the last exchange, of the current
shards and of each teacher's shards; bytes) and OUT/logits_rank{r}.pt: `sent`, my eval-mode
logits on a fixed batch (my data rank's first validation batch) computed with the weights I
sent at the last exchange, just before sending them; `teachers`, each teacher's forward on the
same batch at the end of the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from codistill_ds.backends.base import evaluating
from codistill_ds.config import load_config
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.exchange.weights import digest
from codistill_ds.run.job import build_job
from runs import split_runs


def run_one(out: Path, cfg) -> None:
    job = build_job(cfg)
    w = job.loop.teachers
    batch = job.loop.val_batches[0]  # rank p of every group holds the same one
    sent: dict = {}
    exchange = w.exchange

    def exchange_and_record(e: int = 0) -> float:
        with evaluating(job.backend):
            sent["logits"] = job.backend.forward(batch[:, :-1]).float().clone()
        return exchange(e)

    w.exchange = exchange_and_record
    job.loop.run()
    with torch.no_grad():
        teachers = {g: p.float() for g, p in zip(w.peer_groups, w.predictions(batch[:, :-1]))}
    t = job.topology
    torch.save({"sent": sent["logits"], "teachers": teachers}, out / f"logits_rank{t.rank}.pt")
    result = {
        "rank": t.rank, "group": t.group_id, "group_rank": t.position,
        "sent": w.last_sent_digest, "current": digest(job.backend.shards()),
        "teachers": {str(g): digest(teacher.shards()) for g, teacher in w.teachers.items()},
        "bytes": w.bytes_sent, "shard_numel": sum(s.numel() for s in job.backend.shards()),
    }
    (out / f"rank{t.rank}.json").write_text(json.dumps(result))


def main() -> None:
    out, config = Path(sys.argv[1]), sys.argv[2]
    for run_out, sets in split_runs(out, sys.argv[3:]):
        run_one(run_out, load_config(config, sets))
    shutdown()  # the same end as `codistill-ds train`
    exit_process(0)


if __name__ == "__main__":
    main()
