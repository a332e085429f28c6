"""Rank program of a group job that holds the shared secret but is a bad peer. Args: OUT CONFIG
[overrides...]. Trains its own model normally; what it sends depends on its exchange index e:

  even e          finite random logits (standard normal x 12: sharp, and about as wrong as can be)
  odd e, in turn  truncated (half the payload's bytes), oversized (3x: capped by the receivers),
                  ids (ids past the vocabulary), nan (NaN values), scale (log-probabilities > 0),
                  liar (its real predictions, a reported loss of 1000), badtag (a frame tag that
                  does not verify)

and OUT/rounds.json records, per exchange index, the kind it sent and the groups in that round,
so a test can compute exactly what each receiver must have skipped and why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from codistill_ds.config import load_config
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.exchange import logits as lg
from codistill_ds.exchange.engine import ExchangeEngine
from codistill_ds.exchange.transport import lighthouse, trust
from codistill_ds.exchange.wire import CompressedLogits, wire_dtype
from codistill_ds.run import job as train

ODD = ("truncated", "oversized", "ids", "nan", "scale", "liar", "badtag")
ROUNDS: dict[int, list] = {}


def kind_of(e: int) -> str:
    return "random" if e % 2 == 0 else ODD[(e // 2) % len(ODD)]


def install(out: Path) -> None:
    payload, round_ = ExchangeEngine._payload, lighthouse.LighthouseMember.round

    def bad_payload(self, e, logits, batch):
        mine, kind, s = payload(self, e, logits, batch), kind_of(e), self.s
        if kind == "random":
            noise = torch.randn(lg.num_tokens(logits), mine.wire_format().vocab,
                                generator=torch.Generator().manual_seed(e)) * 12
            return lg.compress(noise, s.topk, wire_dtype(s.dtype), s.kind, s.temperature, s.index_dtype)
        if kind == "ids":
            ids = mine.indices.clone()
            ids[::3, 0] = mine.wire_format().vocab + 5
            return CompressedLogits(mine.values, ids, mine.kind, mine.fmt)
        if kind == "nan":
            return CompressedLogits(torch.full_like(mine.values, float("nan")), mine.indices, mine.kind, mine.fmt)
        if kind == "scale":
            return CompressedLogits((mine.values.abs() + 0.5).to(mine.values.dtype), mine.indices, mine.kind, mine.fmt)
        return mine

    def bad_round(self, e, buf, report=None):
        kind = kind_of(e)
        if kind == "truncated":
            buf = buf[:buf.numel() // 2].clone()
        elif kind == "oversized":
            buf = torch.cat([buf, buf, buf])
        elif kind == "liar":
            report = {"loss": 1000.0, "step": (report or {}).get("step", 0)}
        tag = trust.frame_tag
        if kind == "badtag":
            trust.frame_tag = lambda *a: bytes(trust.TAG_BYTES)
        try:
            got = round_(self, e, buf, report)
        finally:
            trust.frame_tag = tag
        ROUNDS[e] = [kind, sorted(p.group for p in got)]
        (out / "rounds.json").write_text(json.dumps(ROUNDS))
        return got

    ExchangeEngine._payload, lighthouse.LighthouseMember.round = bad_payload, bad_round


def main() -> None:
    out, cfg = Path(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
    out.mkdir(parents=True, exist_ok=True)
    install(out)
    train.run(cfg)
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
