"""Reading a Lighthouse quorum: who a round may exchange with, and which groups left for good.

Every member of a quorum reads the same member data and computes the same answer, so a job
that is refused (no or another shared secret, another exchange contract, a group id already
running) is left out by everyone without a message between them, and refuses itself
(`IncompatibleGroup`, one line naming the field).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from codistill_ds.exchange.transport import trust
from codistill_ds.exchange.transport.contract import (
    IncompatibleGroup,
    contract_mismatch,
    reference_contract,
)


def compatible(quorum: Any, *, key: bytes | None, contract: dict, group_id: int, nonce: str,
               warn: Callable[[str, str], None], seen: dict[str, trust.Member] | None = None) -> list[trust.Member]:
    """The quorum's participants this round may exchange with, in replica-id order: those whose
    member data verifies under my secret (trust.py), then those holding the contract most of
    them share (a newcomer never displaces the running groups), then one job per group id, the
    oldest (a second job claiming a running group's id is refused). Raises `IncompatibleGroup`
    when the refusal is mine. `seen` (while joining) collects the members of every quorum so
    far: the Lighthouse may answer a newcomer with quorums that hold only some of the running
    groups, so the refusal counts all of them."""
    everyone = [trust.open_member(p, key) for p in quorum.participants]
    if seen is not None:
        seen.update((m.replica_id, m) for m in everyone)
    why = trust.refusal(list(seen.values()) if seen is not None else everyone, key)
    if why is not None:
        raise IncompatibleGroup("codistill.secret_file", why)
    for m in everyone:
        if not m.verified:
            warn(f"auth{m.replica_id}", f"left quorum member {m.replica_id} out of every round: its member "
                 "data does not verify under this job's shared secret (or lack of one)")
    parts = [m for m in everyone if m.verified]
    reference = reference_contract([m.data for m in parts])
    why = contract_mismatch(contract, reference)
    if why is not None:
        field, detail = why.split(": ", 1)
        raise IncompatibleGroup(field, f"refused by the running codistillation groups: {detail}")
    ok = [p for p in parts if p.data["contract"] == reference]
    oldest: dict[int, Any] = {}
    for p in ok:
        g, age = int(p.data["group"]), (p.data["started"], p.data["nonce"])
        if g not in oldest or age < (oldest[g].data["started"], oldest[g].data["nonce"]):
            oldest[g] = p
    if group_id in oldest and oldest[group_id].data["nonce"] != nonce:
        other = oldest[group_id].data
        raise IncompatibleGroup("codistill.group_id", f"group {group_id} is already trained by another job "
                                f"(running since {time.ctime(other['started'])}); give each job its own group id")
    return [p for p in ok if oldest[int(p.data["group"])] is p]


def learn_retired(retired: dict[int, str], members: list[trust.Member]) -> None:
    """Update `retired` (group id -> nonce of a job that announced it left for good) from the
    retire marks seen in a quorum or passed on by its members; a group present again (a new
    job: another nonce) is no longer retired. Only verified members are read."""
    for m in members:
        marks = m.data.get("retired")
        for g, n in (marks.items() if isinstance(marks, dict) else ()):
            retired.setdefault(int(g), n)
        if m.data.get("retiring"):
            retired[int(m.data["group"])] = m.data["nonce"]
    for m in members:
        g = int(m.data["group"])
        if not m.data.get("retiring") and retired.get(g) not in (None, m.data["nonce"]):
            del retired[g]
