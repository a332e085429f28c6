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
    "mode": "codistill.mode",
    "route": "codistill.route",
    "exchange_batch": "codistill.exchange_batch",
    "group_size": "world_size",
    "groups": "codistill.groups",
    "micro_batch_size": "data.micro_batch_size",
    "grad_accum": "train.grad_accum",
    "model": "model",
    "backend": "backend.name",
    "max_groups": "codistill.max_groups",
}
"""What every group of a quorum must share, and the config field that sets each: predictions
are only comparable on the same tokens (corpus, seed, batch shape), the same vocabulary, and
the same wire format; and the same group slots (`codistill.max_groups`: the data is split into
that many shards, and group ids stay below it). Modes that pair rank r with rank r, or derive a
peer's batches, add the shape they rely on (`exchange_contract`); elsewhere those entries are
None."""


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
                      exchange_batch_size: int, seq_len: int, kind: str, group_size: int | None = None,
                      train_stream: tuple[int, int] | None = None, model: tuple[str, str] | None = None) -> dict:
    """The fields of `CONTRACT_FIELDS`, as plain values the Lighthouse can carry ("auto" ids
    resolved against the vocabulary: the payload size depends on the resolved width). `kind`
    is the payload kind the engine sends (`ExchangeSettings.kind`).

    What only some modes rely on is None elsewhere, so it never refuses a group that could
    exchange: `group_size` (S) where rank r meets rank r (route rails, weights) or a peer
    derives my per-rank batches (train); `train_stream` (micro_batch_size, grad_accum) and the
    group count where a peer derives my training batches (train); `model` (a digest of the
    architecture, the backend and its precision) where shards cross (weights)."""
    from codistill_ds.exchange.wire import choose_index_dtype

    train, weights = cd.exchange_batch == "train" and cd.mode == "logits", cd.mode == "weights"
    shaped = train or weights or cd.route == "rails"
    if shaped and group_size is None:
        raise ValueError(f"the exchange contract of route {cd.route!r}, mode {cd.mode!r} and exchange_batch "
                         f"{cd.exchange_batch!r} needs the group size")
    if (train and train_stream is None) or (weights and model is None):
        raise ValueError("the exchange contract needs the training stream (exchange_batch train) or the "
                         "model (mode weights) of this group")
    return {"vocab_size": int(vocab_size), "corpus": corpus_digest, "seed": int(seed),
            "exchange_batch_size": int(exchange_batch_size), "seq_len": int(seq_len),
            "topk": int(cd.topk), "dtype": cd.dtype, "index_dtype": choose_index_dtype(cd.index_dtype, vocab_size),
            "kind": kind, "temperature": float(cd.temperature), "token_fraction": float(cd.token_fraction),
            "mode": cd.mode, "route": cd.route, "exchange_batch": cd.exchange_batch if cd.mode == "logits" else None,
            "group_size": int(group_size) if shaped else None, "groups": int(cd.group_slots) if train else None,
            "micro_batch_size": int(train_stream[0]) if train else None,
            "grad_accum": int(train_stream[1]) if train else None,
            "model": model[0] if weights else None, "backend": model[1] if weights else None,
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


