"""`codistill-ds lighthouse`: the meeting point of codistillation groups that run as separate jobs.

It is torchft's Lighthouse (the Rust server inside the `torchft` wheel), with the settings that
matter for codistillation exposed and documented; `torchft_lighthouse` works as well. Groups
find it through `codistill.lighthouse=http://HOST:PORT` (`transport: torchft`).

    codistill-ds lighthouse --port 29510
    torchrun --nproc_per_node 2 -m codistill_ds.cli train --config c.yaml \
        --set codistill.transport=torchft codistill.group_id=0 codistill.lighthouse=http://HOST:29510

How its timeouts show up in training (torchft src/lighthouse.rs, `quorum_compute`):
- a group that stops heartbeating is dropped from quorums after `--heartbeat-timeout-ms`; with
  two groups the survivor waits that long (a quorum needs more than half of the groups still
  heartbeating: the split-brain rule), with three or more it waits at most `--join-timeout-ms`;
- a live group that is late for a round (a slow step, a checkpoint save) is waited for up to
  `--join-timeout-ms`, then the round goes on without it;
- a group that retired (`codistill-ds retire`, or its job ended) is held in the next quorum
  until its heartbeat times out; the others do not wait for it (they train on without peers
  until that quorum forms).

`RUST_LOG=info codistill-ds lighthouse ...` logs every quorum request and quorum (default: warn).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from urllib.parse import urlparse


def add_lighthouse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=29510, help="TCP port (0 picks a free one)")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--min-replicas", type=int, default=1,
                   help="groups needed for any round (1: a lone survivor keeps exchanging with nobody)")
    p.add_argument("--join-timeout-ms", type=int, default=5000,
                   help="how long a round waits for a live group that is late")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=2000,
                   help="silence after which a group counts as gone")
    p.add_argument("--quorum-tick-ms", type=int, default=50, help="how often the server re-checks a pending round")


def start_lighthouse(port: int = 0, bind: str = "127.0.0.1", min_replicas: int = 1,
                     join_timeout_ms: int = 5000, heartbeat_timeout_ms: int = 2000,
                     quorum_tick_ms: int = 50):
    """An in-process Lighthouse; returns (server, URL). The URL names the bound address (the
    server itself reports the machine's hostname, which may not resolve for the groups). Its
    log is warnings only unless RUST_LOG says otherwise (see `run_lighthouse`)."""
    os.environ.setdefault("RUST_LOG", "warn")  # read once, when torchft is first imported
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind=f"{bind}:{port}", min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                              quorum_tick_ms=quorum_tick_ms, heartbeat_timeout_ms=heartbeat_timeout_ms)
    actual = urlparse(server.address()).port
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "[::]") else bind
    return server, f"http://{host}:{actual}"


def run_lighthouse(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM. The server's own log is warnings only unless RUST_LOG says
    otherwise: at info it writes three lines per group per exchange round (every request and
    every quorum with all member data), megabytes an hour, on the machine the groups share."""
    server, url = start_lighthouse(args.port, args.bind, args.min_replicas, args.join_timeout_ms,
                                   args.heartbeat_timeout_ms, args.quorum_tick_ms)
    print(f"codistill-ds lighthouse: listening on {url} (bind {args.bind}); groups use "
          f"--set codistill.transport=torchft codistill.lighthouse={url}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.shutdown()
    return 0
