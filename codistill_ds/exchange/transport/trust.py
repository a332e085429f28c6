"""Who may take part in a torchft round, and whether a payload's bytes may be used.

Anyone who reaches the Lighthouse can join a quorum, read the member data of every participant,
and configure a gloo process group with them. A shared secret (`codistill.secret_file`, or the
CODISTILL_SECRET environment variable; never written to config.yaml, metrics or logs) turns
that into membership, with two HMAC-SHA256 tags (docs/design.md, "Trusting peers"):

- **member data**: each job's quorum data travels as one canonical JSON string (`signed`: group,
  exchange index, the exchange contract, nonce, start time, generation, its replica id) and `auth` = HMAC(secret, "member|" + signed). The string
  is signed as sent, so no JSON re-encoding by the Lighthouse can change what is verified. Every
  member verifies every other member before the gloo group is configured: a member that does
  not verify is left out of the round by everyone, and a job whose secret is missing or
  different from the members that outnumber it refuses itself with one line (exit 2).
- **payload frame**: after the quorum, each member appends HMAC(secret, "frame|" + quorum id,
  generation, member list, sender, its exchange index, its byte count, the payload) to its
  payload, in every collective of every mode (`frames.py`: the payload there begins with a
  header holding the exchange index, byte count and the loss the group reports, so all of them
  are signed). The quorum id and exchange index make the tag fresh for this round: member data
  replayed from an earlier round, or bytes injected into the gloo group, do not verify and are
  skipped (reason "auth"), never distilled on.

The rule that refuses a job is deliberately one-sided: a job is refused only by members holding
a tag it cannot verify that *outnumber* those it can (itself included), so a single job without
the secret can never make a running group stop, while a job with another secret (or none) that
meets two running groups is refused. The Lighthouse itself is not authenticated: a flood of
fake members can still deny service, but never inject predictions.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codistill_ds.config import CodistillConfig, ConfigError

SECRET_ENV = "CODISTILL_SECRET"
MIN_SECRET_BYTES = 16
"""Shorter secrets are refused: a guessable secret proves nothing."""
TAG_BYTES = 32
"""HMAC-SHA256 appended to each payload frame when a secret is in use."""
FRAME_CAP = 2
"""Frames never grow past this many times the payload size most members declare (a declared size
is otherwise only a number an attacker chooses)."""


_FIELDS = {"group": int, "exchange": int, "contract": dict, "nonce": str, "started": (int, float),
           "gen": int}
"""Member data fields every participant must carry, with their types: anything else is left out
of the round (with or without a secret), never read."""


def load_secret(cd: CodistillConfig) -> bytes | None:
    """The shared secret of transport torchft, or None (no authentication); one line naming the
    field when it is unusable. Runs on every rank at start; the value is never printed."""
    if cd.transport != "torchft":
        return None
    if cd.secret_file:
        try:
            secret = Path(cd.secret_file).read_bytes().strip()
        except OSError as err:
            raise ConfigError("codistill.secret_file", f"cannot read {cd.secret_file}: "
                              f"{err.strerror or err}") from None
        where = f"{cd.secret_file} holds"
    elif os.environ.get(SECRET_ENV):
        secret, where = os.environ[SECRET_ENV].strip().encode(), f"the {SECRET_ENV} environment variable holds"
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError("codistill.secret_file", f"{where} {len(secret)} bytes; a shared secret needs at "
                          f"least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32 > FILE`)")
    return secret


@dataclass
class Member:
    """One quorum participant as this job sees it: the fields it signed, whether it carries a
    tag, and whether that tag verifies under my secret (with no secret: whether it carries none)."""

    replica_id: str
    store_address: str
    data: dict
    tagged: bool
    verified: bool


def seal(fields: dict, key: bytes | None) -> dict:
    """Quorum data for the Lighthouse: the fields as one canonical string and its tag."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return {"signed": text, "auth": None if key is None else _mac(key, b"member|", text.encode())}


def open_member(participant: Any, key: bytes | None) -> Member:
    """Parse and verify one participant's quorum data (malformed data: unverified, no fields)."""
    raw = dict(participant.data or {})
    tag = raw.get("auth")
    try:
        fields = json.loads(raw["signed"])
        if not isinstance(fields, dict) or fields.get("replica") != participant.replica_id or \
                not all(isinstance(fields.get(k), t) for k, t in _FIELDS.items()):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        return Member(participant.replica_id, participant.store_address, {}, tag is not None, False)
    if key is None:
        ok = tag is None
    else:
        ok = isinstance(tag, str) and hmac.compare_digest(tag, _mac(key, b"member|", raw["signed"].encode()))
    return Member(participant.replica_id, participant.store_address, fields, tag is not None, ok)


def refusal(members: list[Member], key: bytes | None) -> str | None:
    """Why this job may not join, or None: the members whose tag I cannot verify outnumber those
    I can (myself included). Members with no tag never refuse a job that has a secret."""
    mine = sum(m.verified for m in members)
    others = sum(m.tagged and not m.verified for m in members)
    if others <= mine:
        return None
    if key is None:
        return (f"refused by the running codistillation groups: {others} of them authenticate with a shared "
                f"secret and this job has none (set codistill.secret_file or {SECRET_ENV})")
    return (f"refused by the running codistillation groups: this job's shared secret does not match that "
            f"of {others} running group(s) (codistill.secret_file or {SECRET_ENV})")


def frame_size(declared: list[int]) -> int:
    """Payload bytes of every member's frame this round, from the sizes the members declared
    (all compute the same, whatever their own payload): the largest, capped at FRAME_CAP x the
    size most members declare (ties: the smallest), so one member cannot make everyone allocate
    what it likes. Every member's gloo buffer must be this size: gloo aborts the process on a
    message of another size."""
    sizes = [max(int(d), 0) for d in declared]
    counts = Counter(sizes)
    cap = FRAME_CAP * max(min(counts, key=lambda d: (-counts[d], d)), 1)
    return max(min(d, cap) for d in sizes)


def frame(payload: torch.Tensor, size: int, tag: bytes | None) -> torch.Tensor:
    """My payload in a frame of `size` bytes (zero-padded or cut), then the tag if any."""
    out = torch.zeros(size + (len(tag) if tag else 0), dtype=torch.uint8)
    n = min(payload.numel(), size)
    out[:n] = payload[:n]
    if tag:
        out[size:] = torch.frombuffer(bytearray(tag), dtype=torch.uint8)
    return out


def frame_tag(key: bytes, round_id: str, sender: str, exchange: int, nbytes: int, payload: torch.Tensor) -> bytes:
    """HMAC over the round (quorum id, generation, members), the sender, its exchange index and
    declared byte count, and the payload bytes it holds."""
    h = hmac.new(key, f"frame|{round_id}|{sender}|{exchange}|{nbytes}|".encode(), hashlib.sha256)
    h.update(payload.contiguous().numpy().tobytes())
    return h.digest()


def open_frame(got: torch.Tensor, size: int, nbytes: int, expected: int, key: bytes | None, round_id: str,
               sender: str, exchange: int) -> tuple[torch.Tensor | None, str | None]:
    """(payload, None) or (None, reason) for one received frame: its tag first ("auth"), then its
    byte length against the contract's ("malformed": truncated or oversized)."""
    body = got[:min(max(int(nbytes), 0), size)]
    if key is not None:
        tag = got[size:size + TAG_BYTES].numpy().tobytes()
        if not hmac.compare_digest(tag, frame_tag(key, round_id, sender, exchange, int(nbytes), body)):
            return None, "auth"
    if int(nbytes) != expected or body.numel() != expected:
        return None, "malformed"
    return body, None


def _mac(key: bytes, label: bytes, message: bytes) -> str:
    return hmac.new(key, label + message, hashlib.sha256).hexdigest()
