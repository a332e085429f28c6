"""What a transport is: the one thing that carries predictions between codistillation groups.

The exchange engine (`exchange/engine.py`) decides what to send and when; a transport only moves
one round of compressed predictions and says what came back. Two implement it:

- `world.LogitExchange` (`transport: world`): one job holds every group; the routes `leaders`
  and `rails` run over that job's process groups, all groups in lockstep;
- `ft.TorchFTTransport` (`transport: torchft`): each group is its own job; the leaders meet in a
  torchft quorum per round (`lighthouse.LighthouseMember`), under an exchange contract
  (`contract.py`), and whoever is present answers.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from codistill_ds.exchange.wire import CompressedLogits


@dataclass
class ExchangeResult:
    """What one round delivered to this rank: peers' predictions for my slice, group order."""

    peers: list[CompressedLogits]
    peer_groups: list[int]
    seconds: float
    peer_exchanges: list[int] | None = None
    """Exchange index each peer predicted on; None: all on the batch I posted (lockstep)."""
    bytes_sent: int = 0
    """What this rank handed to other groups in this round."""
    peer_reports: list[dict | None] | None = None
    """What each peer says of itself ({"loss", "step"}: its recent training loss, for the peer
    guard, exchange/guard.py); None: the transport carries no reports."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Peers whose payload the transport refused before unpacking, by reason ("malformed": wrong
    byte length, "auth": a tag that does not verify); the same on every rank of my group."""


class Transport(Protocol):
    """Carries one round of compressed predictions between groups."""

    bytes_sent: int

    def exchange(self, local: CompressedLogits, e: int, report: dict | None = None) -> ExchangeResult:
        """Blocking swap of my predictions on exchange batch e; `report` ({"loss", "step"}, or
        None) is what my group tells its peers of itself (`ExchangeResult.peer_reports`)."""

    def start(self, local: CompressedLogits, e: int, report: dict | None = None) -> Future:
        """Post the swap; `.result()` gives the `ExchangeResult`. Rounds run in posting order."""

    def join(self, groups: int, wait_s: float) -> int:
        """Start-up rendezvous: wait (up to `wait_s`) for `groups` groups; returns how many came."""

    def close(self) -> None: ...
