"""The exchange contract of groups that run as separate jobs, and the check that the Lighthouse
can be reached at all.

Predictions are only comparable on the same tokens (corpus, seed, batch shape), the same
vocabulary and the same wire format. Each group job states these in its member data; a group
whose contract differs from the running groups' is refused with one line naming the config
field, and nobody else is disturbed (`lighthouse.LighthouseMember`).
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

from codistill_ds.config import CodistillConfig, ConfigError

CONTRACT_FIELDS = {
    "vocab_size": "data.tokenizer",
    "corpus": "data.train_files",
    "seed": "seed",
    "exchange_batch_size": "data.exchange_batch_size",
    "seq_len": "data.seq_len",
    "topk": "codistill.topk",
    "dtype": "codistill.dtype",
    "index_dtype": "codistill.index_dtype",
    "kind": "codistill.loss",
    "temperature": "codistill.temperature",
    "token_fraction": "codistill.token_fraction",
    "max_groups": "codistill.max_groups",
}
"""What every group of a quorum must share, and the config field that sets each: predictions
are only comparable on the same tokens (corpus, seed, batch shape), the same vocabulary, and
the same wire format; and the same group slots (`codistill.max_groups`: the data is split into
that many shards, and group ids stay below it)."""


def check_reachable(url: str, timeout_s: float) -> None:
    """A TCP connect to the Lighthouse, on every rank before anything heavy starts: an address
    that is wrong or down fails within `timeout_s` with one line, not after the model is built.
    A refused connection is retried until then (the Lighthouse may be starting alongside)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
        raise ConfigError("codistill.lighthouse", f"expected http://host:port, got {url!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            left = max(deadline - time.monotonic(), 0.1)
            with socket.create_connection((parsed.hostname, parsed.port), timeout=left):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError("codistill.lighthouse", f"cannot reach the Lighthouse at {url} within "
                                  f"{timeout_s:.0f}s ({err.strerror or err}); start it with `codistill-ds "
                                  "lighthouse --port PORT` and check host and port") from None
            time.sleep(0.2)


class IncompatibleGroup(ConfigError):
    """This job cannot join the running groups (another exchange contract, or a taken group id)."""


def exchange_contract(cd: CodistillConfig, *, vocab_size: int, corpus_digest: str, seed: int,
                      exchange_batch_size: int, seq_len: int, kind: str) -> dict:
    """The fields of `CONTRACT_FIELDS`, as plain values the Lighthouse can carry ("auto" ids
    resolved against the vocabulary: the payload size depends on the resolved width). `kind`
    is the payload kind the engine sends (`ExchangeSettings.kind`)."""
    from codistill_ds.exchange.wire import choose_index_dtype

    return {"vocab_size": int(vocab_size), "corpus": corpus_digest, "seed": int(seed),
            "exchange_batch_size": int(exchange_batch_size), "seq_len": int(seq_len),
            "topk": int(cd.topk), "dtype": cd.dtype, "index_dtype": choose_index_dtype(cd.index_dtype, vocab_size),
            "kind": kind, "temperature": float(cd.temperature), "token_fraction": float(cd.token_fraction),
            "max_groups": cd.group_slots}


def reference_contract(members: list[dict]) -> dict:
    """The contract a quorum's groups agree on: the one most members hold; on a tie the oldest
    job's (a running group is never displaced by a newcomer), then the lowest group id's."""
    tally: dict[str, list[dict]] = {}
    for m in members:
        tally.setdefault(repr(sorted(m["contract"].items())), []).append(m)
    best = max(tally.values(), key=lambda ms: (len(ms), -min(m["started"] for m in ms),
                                               -min(m["group"] for m in ms)))
    return best[0]["contract"]


def contract_mismatch(mine: dict, reference: dict) -> str | None:
    """Name of the first config field whose contract value differs, with both values."""
    for key, field in CONTRACT_FIELDS.items():
        if mine.get(key) != reference.get(key):
            return f"{field}: this group has {key}={mine.get(key)!r}, the running groups have {reference.get(key)!r}"
    return None


