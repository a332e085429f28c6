"""`transport: torchft`: each codistillation group is its own job; groups meet per exchange round.

Codistillation needs only weak synchronization (Anil et al. 2018; Sodhani et al., arXiv
2010.02838): a group can train on without its peers and lose only their predictions. Here the
runtime matches the method. Every group is a separate `torchrun`/`deepspeed` job with its own
world (ZeRO/FSDP shard over all of it), its own checkpoints and its own failures. The group
leaders meet through a torchft Lighthouse (meta-pytorch/torchft): each exchange round asks for a
quorum of the groups alive now, configures torchft's reconfigurable gloo process group over
them, and all-gathers the predictions. A group that dies, stops or loses its link drops out of
the next quorum (after the Lighthouse's heartbeat timeout); the others keep training, with the
distillation term over the peers present. A restarted group resumes from its own checkpoint
(`checkpoint.py`: nothing of a peer is ever loaded, torchft's healing is not used) and is in
the next quorum it asks for.

Per round, on every rank of my group (the leaders route, DESIGN.md "Exchange"):

    gather my slice on the leader -> leader: quorum, all-gather whole-batch payloads with the
    compatible peers -> broadcast who answered -> scatter rank r its rows of every peer

Payloads travel as one whole-batch `pack`ed buffer per group, so groups with different rank
counts meet on the same bytes. Who sent what, and on which exchange batch, travels in the
quorum's member data, not in the payload: the byte count is the predictions only, exactly as
in `transport: world`. The member data also carries the *exchange contract* (vocabulary,
corpus, shared-stream seed, batch shape, top-k, wire dtype, payload kind, temperature): a
group whose contract differs from the running groups' is refused with one line naming the
field, and nobody else is disturbed; two jobs that claim the same group id are both visible
(each job's replica id carries a nonce) and the younger one is refused.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from codistill_ds.distributed import comm
from codistill_ds.exchange.wire import CompressedLogits, pack
from codistill_ds.config import ConfigError
from codistill_ds.exchange.engine import ExchangeResult
from codistill_ds.distributed.topology import Topology

HEARTBEAT_S = 0.1
"""Seconds between heartbeats to the Lighthouse (its heartbeat timeout decides when a silent
group is dropped from quorums)."""
UNREACHABLE_S = 1.5
"""No heartbeat has reached the Lighthouse for this long: the link is down, skip rounds."""

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
}
"""What every group of a quorum must share, and the config field that sets each: predictions
are only comparable on the same tokens (corpus, seed, batch shape), the same vocabulary, and
the same wire format."""


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


def exchange_contract(vocab_size: int, corpus_digest: str, seed: int, exchange_batch_size: int,
                      seq_len: int, topk: int, dtype: str, kind: str, temperature: float,
                      index_dtype: str = "auto", token_fraction: float = 1.0) -> dict:
    """The fields of `CONTRACT_FIELDS`, as plain values the Lighthouse can carry ("auto" ids
    resolved against the vocabulary: the payload size depends on the resolved width)."""
    from codistill_ds.exchange.wire import choose_index_dtype

    return {"vocab_size": int(vocab_size), "corpus": corpus_digest, "seed": int(seed),
            "exchange_batch_size": int(exchange_batch_size), "seq_len": int(seq_len),
            "topk": int(topk), "dtype": dtype, "index_dtype": choose_index_dtype(index_dtype, vocab_size),
            "kind": kind, "temperature": float(temperature), "token_fraction": float(token_fraction)}


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


def _route_to(url: str) -> tuple[str, str | None]:
    """(my address as the Lighthouse host sees it, the name of its network interface).

    The leader's store and gloo sockets must be reachable by the other groups' leaders; the
    address that routes to the Lighthouse is the one that does. Gloo picks its interface from
    the hostname unless GLOO_SOCKET_IFNAME names one, which on some machines (this one) is an
    address nobody else can reach."""
    host = urlparse(url).hostname or "127.0.0.1"
    port = urlparse(url).port or 29510
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), port))
        addr = s.getsockname()[0]
    return addr, _interface_of(addr)


def _interface_of(addr: str) -> str | None:
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            if socket.inet_ntoa(packed[20:24]) == addr:
                return name
        except OSError:
            continue
    return None


@dataclass
class PeerPayload:
    """One peer group's whole-batch predictions from a round."""

    group: int
    exchange: int
    payload: torch.Tensor


class LighthouseMember:
    """A group leader's membership: heartbeats, one quorum per round, the reconfigurable gloo
    process group over the compatible members, and the all-gather of their payloads."""

    def __init__(self, lighthouse: str, group_id: int, contract: dict, timeout_s: float,
                 connect_timeout_s: float = 10.0) -> None:
        from torchft._torchft import LighthouseClient
        from torchft.process_group import ProcessGroupGloo

        self.url, self.group_id, self.contract = lighthouse, group_id, contract
        self.nonce, self.started = uuid.uuid4().hex, time.time()
        self.replica_id = f"group_{group_id}_{self.nonce[:12]}"
        """Unique per job, so two jobs claiming one group id are both visible in a quorum (the
        Lighthouse keys members by replica id) and the younger is refused deterministically."""
        self.timeout = datetime.timedelta(seconds=timeout_s)
        host, iface = _route_to(lighthouse)
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        try:
            self.client = LighthouseClient(lighthouse, datetime.timedelta(seconds=connect_timeout_s))
            self.client.heartbeat(self.replica_id, datetime.timedelta(seconds=connect_timeout_s))
        except Exception as err:  # noqa: BLE001 -- the Rust client raises plain RuntimeError/TimeoutError
            raise ConfigError("codistill.lighthouse", f"cannot reach the Lighthouse at {lighthouse} "
                              f"within {connect_timeout_s:.0f}s ({type(err).__name__}: {err}); start it "
                              "with `codistill-ds lighthouse --port PORT`") from None
        self.store = torch.distributed.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                                timeout=self.timeout)
        self.store_address = f"{host}:{self.store.port}"
        self.pg = ProcessGroupGloo(timeout=self.timeout)
        self.generation = 0
        """Raised after a failed round; the next round's members take the highest generation
        they see and reconfigure, so a broken process group is never reused."""
        self._pg_key: tuple | None = None
        self._last_beat = time.monotonic()
        """When a heartbeat last reached the Lighthouse: while it cannot be reached, rounds are
        skipped at once instead of each waiting out a quorum timeout (training goes on alone)."""
        self.last_heartbeat_error: Exception | None = None
        self.last_quorum_error: Exception | None = None
        """The latest failures of the background heartbeat and of the start-up join (for a report)."""
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self._beat = threading.Thread(target=self._heartbeat, name="codistill-lighthouse-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.client.heartbeat(self.replica_id, datetime.timedelta(seconds=1))
                self._last_beat = time.monotonic()
            except Exception as err:  # noqa: BLE001 -- a lost link: rounds are skipped until a beat gets through
                self.last_heartbeat_error = err

    def reachable(self) -> bool:
        """A heartbeat got through within the last UNREACHABLE_S seconds."""
        return time.monotonic() - self._last_beat < UNREACHABLE_S

    def close(self) -> None:
        self._stop.set()
        self.pg.abort(errored=False)

    def _quorum(self, e: int, joining: bool):
        data = {"group": self.group_id, "exchange": e, "contract": self.contract, "nonce": self.nonce,
                "started": self.started, "gen": self.generation, "joining": joining}
        return self.client.quorum(replica_id=self.replica_id, timeout=self.timeout, address="",
                                  store_address=self.store_address, step=max(e, 0), world_size=1,
                                  shrink_only=False, data=data)

    def _members(self, quorum) -> list[Any]:
        """The quorum's participants this round may exchange with, in replica-id order: those
        holding the contract most members share (a newcomer never displaces the running groups),
        then one job per group id, the oldest (a second job claiming a running group's id is
        refused). Raises `IncompatibleGroup` when the refusal is mine; everyone else computes the
        same list from the same member data and leaves the refused job out."""
        parts = list(quorum.participants)
        reference = reference_contract([dict(p.data) for p in parts])
        why = contract_mismatch(self.contract, reference)
        if why is not None:
            field, detail = why.split(": ", 1)
            raise IncompatibleGroup(field, f"refused by the running codistillation groups: {detail}")
        compatible = [p for p in parts if p.data["contract"] == reference]
        oldest: dict[int, Any] = {}
        for p in compatible:
            g, key = int(p.data["group"]), (p.data["started"], p.data["nonce"])
            if g not in oldest or key < (oldest[g].data["started"], oldest[g].data["nonce"]):
                oldest[g] = p
        if self.group_id in oldest and oldest[self.group_id].data["nonce"] != self.nonce:
            other = oldest[self.group_id].data
            raise IncompatibleGroup("codistill.group_id", f"group {self.group_id} is already trained by "
                                    f"another job (running since {time.ctime(other['started'])}); give "
                                    "each job its own group id")
        return [p for p in compatible if oldest[int(p.data["group"])] is p]

    def join(self, groups: int, wait_s: float) -> int:
        """Block until all `groups` groups are present (or `wait_s` passed); returns how many are."""
        deadline = time.monotonic() + wait_s
        present = 0
        while True:
            try:
                members = self._members(self._quorum(-1, joining=True))
                present = len({m.data["group"] for m in members})
            except IncompatibleGroup:
                raise
            except Exception as err:  # noqa: BLE001 -- no quorum within the timeout: ask again until the deadline
                self.last_quorum_error = err
            if present >= groups or time.monotonic() >= deadline:
                return present
            time.sleep(0.05)

    def round(self, e: int, payload: torch.Tensor) -> list[PeerPayload]:
        """One exchange round: my whole-batch payload to the compatible groups present, theirs
        back. A failed round (a peer died or stopped mid-way) returns [] and is not retried."""
        if not self.reachable():
            self._warn("unreachable", f"the Lighthouse at {self.url} is unreachable; training on without "
                       "peers until it answers again (warned once)")
            return []
        try:
            quorum = self._quorum(e, joining=False)
        except Exception as err:  # noqa: BLE001 -- Lighthouse unreachable or no quorum in time
            self._warn(f"quorum{type(err).__name__}", f"no quorum for exchange {e} ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:120] if str(err) else ''}); training on without peers "
                       "(warned once)")
            return []
        members = [m for m in self._members(quorum) if not m.data.get("joining")]
        if len(members) < 2 or not any(m.replica_id == self.replica_id for m in members):
            return []
        ids = [m.replica_id for m in members]
        self.generation = max(self.generation, *(int(m.data.get("gen", 0)) for m in members))
        try:
            self._configure(members, quorum.quorum_id)
            out = [torch.empty_like(payload) for _ in members]
            from torch._C._distributed_c10d import AllgatherOptions

            self.pg.allgather([out], [payload], AllgatherOptions()).wait()
        except Exception as err:  # noqa: BLE001 -- gloo reports a lost peer as RuntimeError
            self.generation += 1
            self._pg_key = None
            self.pg.abort()
            self._warn(f"round{e}", f"exchange {e} with groups {[m.data['group'] for m in members]} "
                       f"failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); training on")
            return []
        me = ids.index(self.replica_id)
        return [PeerPayload(int(m.data["group"]), int(m.data["exchange"]), out[i])
                for i, m in enumerate(members) if i != me]

    def _configure(self, members: list[Any], quorum_id: int) -> None:
        """A new gloo process group only when the quorum (the Lighthouse bumps its id whenever
        membership changes), our member list or the generation changed; the store prefix names
        all three, so a reconfiguration never reads a previous one's rendezvous keys."""
        ids = tuple(m.replica_id for m in members)
        key = (quorum_id, ids, self.generation)
        if key == self._pg_key:
            return
        prefix = f"codistill/q{quorum_id}/g{self.generation}/{'.'.join(ids)}"
        self.pg.configure(f"{members[0].store_address}/{prefix}", self.replica_id,
                          ids.index(self.replica_id), len(ids))
        self._pg_key = key

    def _warn(self, key: str, text: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        print(f"codistill-ds: warning: group {self.group_id}: {text}", file=sys.stderr, flush=True)


class TorchFTTransport:
    """The engine's transport between group jobs: gather to my leader, a Lighthouse round there,
    scatter back. Every rank of my group calls `exchange`/`start` for every round."""

    def __init__(self, topology: Topology, member: LighthouseMember | None) -> None:
        self.t, self.member = topology, member
        self.bytes_sent = 0
        self._worker: ThreadPoolExecutor | None = None
        self._leader = topology.layout.leader_of(topology.group_id)

    def join(self, groups: int, wait_s: float) -> int:
        """Start-up rendezvous of a fresh start (every rank calls it; the leader waits)."""
        present = self.member.join(groups, wait_s) if self.member is not None else 0
        return comm.broadcast_object(present, src=self._leader, group=self.t.exchange_group)

    def exchange(self, local: CompressedLogits, e: int) -> ExchangeResult:
        return self._swap(local, e)

    def start(self, local: CompressedLogits, e: int) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codistill-ft-exchange")
        return self._worker.submit(self._swap, local, e)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.member is not None:
            self.member.close()

    def _swap(self, local: CompressedLogits, e: int) -> ExchangeResult:
        start = time.perf_counter()
        t = self.t
        slices = comm.gather(pack(local), dst=self._leader, group=t.exchange_group)
        header: dict = {"peers": [], "error": None}
        whole, sent = None, 0
        if slices is not None:
            rows, fmt = local.num_tokens(), local.wire_format()
            whole = _join_slices(slices, rows, local)
            payload = pack(whole)
            try:
                got = self.member.round(e, payload)
                sent = payload.numel() * len(got)
                self.bytes_sent += sent
                header["peers"] = [(p.group, p.exchange) for p in got]
                peers_whole = [fmt.unpack(p.payload, whole.num_tokens()) for p in got]
            except IncompatibleGroup as err:
                header["error"] = (err.field, err.reason)
                peers_whole = []
        header = comm.broadcast_object(header, src=self._leader, group=t.exchange_group)
        if header["error"] is not None:
            raise IncompatibleGroup(*header["error"])
        n = len(header["peers"])
        if n == 0:
            return ExchangeResult([], [], time.perf_counter() - start, [], sent)
        mine = torch.empty(n * pack(local).numel(), dtype=torch.uint8)
        parts = None
        if slices is not None:
            rows = local.num_tokens()
            parts = [torch.cat([pack(p.rows(r * rows, (r + 1) * rows)) for p in peers_whole])
                     for r in range(t.group_size)]
        comm.scatter(mine, parts, src=self._leader, group=t.exchange_group)
        size, fmt = mine.numel() // n, local.wire_format()
        peers = [fmt.unpack(mine[i * size:(i + 1) * size], local.num_tokens()) for i in range(n)]
        return ExchangeResult(peers, [g for g, _ in header["peers"]], time.perf_counter() - start,
                              [e2 for _, e2 in header["peers"]], sent)


def _join_slices(slices: list[torch.Tensor], rows: int, like: CompressedLogits) -> CompressedLogits:
    """My group's slices (rank order) as one whole-batch payload, whatever the group's size."""
    fmt = like.wire_format()
    parts = [fmt.unpack(s, rows) for s in slices]
    values = torch.cat([p.values for p in parts])
    indices = None if like.full_vocab else torch.cat([p.indices for p in parts])
    return CompressedLogits(values, indices, like.kind, like.fmt)
