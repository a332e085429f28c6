"""Two simulated nodes for the communication benchmark: network namespaces joined by a veth pair.

    node 0: namespace <prefix>-<pid>-0, interface <veth0>, 10.77.0.1/30   (master_addr)
    node 1: namespace <prefix>-<pid>-1, interface <veth1>, 10.77.0.2/30

Both ends of the veth carry a token-bucket qdisc (`tc ... tbf rate R burst 64kb latency 50ms`;
netem is not available here), so each direction of the link is capped at R. Only these two
namespaces and their own /30 are touched: no route, bridge or address outside them.

`TwoNodes` is a context manager: the namespaces (and the veth, which dies with them) are removed
on exit, on an exception, and on SIGTERM / SIGINT / SIGHUP (turned into an exception while the
context is open). A run killed with SIGKILL cannot clean up; the next run removes namespaces
with this prefix whose owning process is gone (`remove_stale`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from typing import Self

PREFIX = "cdcomm"
ADDRS = ("10.77.0.1", "10.77.0.2")
BURST, LATENCY = "64kb", "50ms"


class NetnsUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no iproute2, no veth)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          check=check, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete `cdcomm-<pid>-<i>` namespaces left by a benchmark process that no longer exists."""
    try:
        listing = _ip("netns", "list", check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    removed = []
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-[01]", name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def netns_available() -> tuple[bool, str]:
    """Whether `ip netns` and veth pairs work here (root, iproute2, kernel support)."""
    if os.geteuid() != 0:
        return False, "not root: network namespaces need CAP_NET_ADMIN"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return False, f"ip netns add failed: {r.stderr.strip()}"
        r = _in_ns(probe, "tc", "qdisc", "show", check=False)
        if r.returncode != 0:
            return False, f"tc does not work in a namespace: {r.stderr.strip()}"
        return True, ""
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"ip/tc not usable: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


class _Interrupted(BaseException):
    """A signal arrived while the namespaces exist; unwinds through the cleanup."""


class TwoNodes:
    """Create the two namespaces and the capped veth link; remove them on any exit."""

    def __init__(self, rate: str) -> None:
        pid = os.getpid()
        self.ns = (f"{PREFIX}-{pid}-0", f"{PREFIX}-{pid}-1")
        tag = f"{pid % 100000}"
        self.veth = (f"cdc{tag}a", f"cdc{tag}b")  # <= 15 characters (IFNAMSIZ)
        self.addrs = ADDRS
        self.rate = rate
        self._old_handlers: dict = {}

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Self:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, signum, frame) -> None:
        raise _Interrupted(f"signal {signum}")

    def _create(self) -> None:
        remove_stale()
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, addr in zip(self.ns, self.veth, self.addrs):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", veth)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", veth, "up")
            _in_ns(ns, "tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", self.rate,
                   "burst", BURST, "latency", LATENCY)

    def close(self) -> None:
        """Delete both namespaces (the veth pair goes with them); idempotent."""
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        # If only the host-side link was created (failure between add and move), drop it too.
        subprocess.run(["ip", "link", "del", self.veth[0]], capture_output=True, check=False)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # -- link control -----------------------------------------------------------------------
    def set_rate(self, rate: str) -> None:
        for ns, veth in zip(self.ns, self.veth):
            _in_ns(ns, "tc", "qdisc", "replace", "dev", veth, "root", "tbf", "rate", rate,
                   "burst", BURST, "latency", LATENCY)
        self.rate = rate

    def counters(self) -> dict:
        """tx/rx bytes and packets of each node's veth, and the qdisc's sent/dropped counts."""
        out = {}
        for i, (ns, veth) in enumerate(zip(self.ns, self.veth)):
            link = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", "dev", veth).stdout)[0]
            stats = link.get("stats64") or link.get("stats")
            qdisc = json.loads(_in_ns(ns, "tc", "-s", "-j", "qdisc", "show", "dev", veth).stdout)
            root = next((q for q in qdisc if q.get("kind") == "tbf"), {})
            out[f"node{i}"] = {
                "tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                "tx_packets": stats["tx"]["packets"], "qdisc_bytes": root.get("bytes"),
                "qdisc_drops": root.get("drops"), "qdisc_overlimits": root.get("overlimits"),
            }
        return out

    def command(self, node: int, argv: list[str]) -> list[str]:
        """argv run inside node `node`'s namespace."""
        return ["ip", "netns", "exec", self.ns[node], *argv]


def main() -> None:  # pragma: no cover - manual check: python _comm_netns.py
    ok, why = netns_available()
    print("netns available:", ok, why)
    if ok:
        with TwoNodes("100mbit") as n:
            print(n.ns, n.veth, n.counters())
    print("left:", _ip("netns", "list", check=False).stdout.strip() or "(none)")


if __name__ == "__main__":
    main()
