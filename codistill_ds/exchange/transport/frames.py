"""What one member puts into a round's collective between group jobs: a frame.

Every collective of `transport: torchft` (the leaders' all-gather and all-to-all, and each
rail's, `quorum_pg.py`) carries frames, never bare payloads:

    header   32 bytes: exchange index, payload bytes, reported loss, reported step (int64,
             int64, float64, int64; loss NaN: no report)
    payload  zero-padded or cut to the round's frame size
    tag      HMAC-SHA256 (`trust.TAG_BYTES`), only with a shared secret

The header travels inside the round, next to the predictions it describes, so who predicted
on which exchange batch and the loss a group reports of itself (the peer guard's input,
`exchange/guard.py`) are those of *this* round, on every route and rail, without a second
message. With a secret the tag (`trust.frame_tag`) covers the round (quorum id, generation,
member list, and for a part of an all-to-all its receiver), the sender, the exchange index, the
byte count and every header and payload byte: a frame replayed from another round, injected,
altered, or meant for another receiver does not verify and is skipped ("auth"), never unpacked.
A frame whose byte count is not what the receiver expects (truncated, oversized) is skipped as
"malformed" (`trust.open_frame`).

The frame size of a round is not taken from anyone's own buffer (gloo aborts the process on a
message of another size): the members agree on it from the sizes they declare
(`trust.frame_size`, capped), once per configured process group (`quorum_pg.QuorumGroup`).
Nothing of a frame but the payload bytes is counted in `bytes_sent`, like the member data: the
count is the predictions only, exactly as in `transport: world`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from codistill_ds.exchange.transport import trust

HEADER_BYTES = 32
NO_PREDICTIONS = -1
"""Exchange index in the header of a member that sends nothing this round (it takes part in a
collective it had agreed to, e.g. when it leaves for good)."""


def frame_bytes(size: int, key: bytes | None) -> int:
    """Bytes of every frame of a round whose payloads travel in `size` bytes."""
    return HEADER_BYTES + size + (trust.TAG_BYTES if key is not None else 0)


def header(e: int, nbytes: int, report: dict | None) -> torch.Tensor:
    """The 32 header bytes: exchange index, payload bytes, report (loss, step)."""
    loss = float("nan") if report is None else float(report.get("loss", float("nan")))
    step = -1 if report is None else int(report.get("step", -1))
    ints = torch.tensor([e, nbytes], dtype=torch.int64).view(torch.uint8)
    return torch.cat([ints, torch.tensor([loss], dtype=torch.float64).view(torch.uint8),
                      torch.tensor([step], dtype=torch.int64).view(torch.uint8)])


def seal(payload: torch.Tensor, size: int, e: int, report: dict | None, key: bytes | None, round_id: str,
         sender: str) -> torch.Tensor:
    """My frame: header, `payload` (flat uint8) padded or cut to `size` bytes, tag if keyed."""
    payload = payload.reshape(-1).cpu()
    inner = torch.cat([header(e, payload.numel(), report), payload])
    body = HEADER_BYTES + size
    tag = None if key is None else trust.frame_tag(key, round_id, sender, e, HEADER_BYTES + payload.numel(),
                                                   inner[:body])
    return trust.frame(inner, body, tag)


@dataclass
class Opened:
    """One received frame: the sender's exchange index, payload and report, or the reason it was
    refused (`problem`: "auth" or "malformed"; payload None)."""

    exchange: int
    payload: torch.Tensor | None
    report: dict | None = None
    problem: str | None = None


def open_sealed(buf: torch.Tensor, size: int, expected: int, key: bytes | None, round_id: str,
                sender: str) -> Opened | None:
    """Check one received frame (tag first, then byte length against `expected`, the size of my
    own payload: the contract makes every member's the same). None when the sender verifiably
    sent nothing this round (NO_PREDICTIONS)."""
    ints = buf[:16].clone().view(torch.int64)
    e, nbytes = int(ints[0]), int(ints[1])
    nothing = e == NO_PREDICTIONS and nbytes == 0
    body, problem = trust.open_frame(buf, HEADER_BYTES + size, HEADER_BYTES + nbytes,
                                     HEADER_BYTES + (0 if nothing else expected), key, round_id, sender, e)
    if problem is not None:
        return Opened(e, None, None, problem)
    if nothing:
        return None
    loss = float(body[16:24].clone().view(torch.float64)[0])
    step = int(body[24:32].clone().view(torch.int64)[0])
    report = None if math.isnan(loss) else {"loss": loss, "step": step}
    return Opened(e, body[HEADER_BYTES:], report)
