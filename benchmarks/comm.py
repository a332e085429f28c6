"""Communication benchmark: what crosses codistillation groups, what it costs, and what it buys.

DESIGN.md's communication targets, measured on the product itself (`codistill_ds.train.run`,
the function behind `codistill-ds train`, with DeepSpeed ZeRO-2 inside each group):

(a) bytes   Cross-group bytes per step for logit exchange, measured by the library's own
            counters (summary.json `cross_group_bytes`, per rank and per group) for both routes
            (leaders, rails) and several top-k sizes including the full vocabulary, checked
            exactly against `codistill_ds.plan.make_plan`; and the gradient all-reduce of
            synchronous data parallelism (`codistill.enabled=false`) on the same model, world
            and steps, measured by instrumenting the `torch.distributed` collectives DeepSpeed
            calls (ring model: all-reduce 2(W-1)/W x N per rank, all-gather (W-1) x N_in) next to
            the formula 2(W-1)/W x P x g. `codistill.mode=weights` (ZeRO-3) is tried through
            config validation first: measured against K(K-1) P w / I when it validates, reported
            as skipped with the library's message when it does not. The 1B-parameter figure
            comes from `codistill-ds plan --params 1B --json`.
(b) overhead  A group's step time with codistillation against the same group training alone,
            exchange-batch compute excluded. Every arm is 2 groups x 1 rank in one job (same
            processes, same CPU load): "alone" never exchanges after step 0 (interval 10^6),
            "exchange-sync" swaps logits every step and blocks on it (staleness 0), "exchange-
            async" posts every step and uses the peers' logits 2 steps later (staleness 2, async;
            "exchange-async-stale8": 8 steps later, more slack for a peer that falls behind).
            These arms use alpha 0, which removes the student forward on the exchange batch by
            configuration (the bytes on the wire are unchanged: alpha only weights the loss),
            and the teacher forward + compression is timed in-process (a wrapper around
            `CodistillLoop._post_exchange` minus the time inside `LogitExchange.exchange/start`)
            and subtracted per step. Arms alternate, in an order rotated every repeat, so load
            drift from other jobs hits all of them alike; the ratio is reported per repeat (each
            against the same repeat's alone arm), as the median of repeats (the headline) and
            pooled. One alpha-1 arm shows the raw step ratio with all exchange compute included.
            A second, same-moment estimate needs no separate arm: with interval 4 and staleness
            2 every 4-step cycle has an exchange-free step, which is the group training alone
            a few tens of ms away from the exchange steps, so bursts of load from other jobs
            hit both alike (see `_comm_report._interleaved`).
(c) twonode Two simulated nodes: two network namespaces joined by a veth pair capped with a
            token bucket (`tc ... tbf rate R burst 64kb latency 50ms` on both ends), 2 ranks per
            node, launched as a real 2-node job (`torchrun --nnodes 2 --node_rank i
            --master_addr 10.77.0.1` inside each namespace, `GLOO_SOCKET_IFNAME` = the veth).
            For each link rate: synchronous ZeRO-2 over all 4 ranks (one group) against 2-group
            codistillation with one group per node (ranks 0-1 on node 0, 2-3 on node 1). Wall
            clock is the sum of per-step `step_ms` (evaluation excluded, the same for both arms);
            the target is the synchronous arm's best validation loss at that rate. The veth's own
            byte counters give the bytes that really crossed the link in each arm. The full mode
            adds an (b) pair (alone, exchange-async-stale8) over the slowest link, one group per
            node.

    .venv/bin/python benchmarks/comm.py --out runs/comm-smoke --smoke   # ~30 s: the test's setting
    .venv/bin/python benchmarks/comm.py --out runs/comm-quick --quick   # ~6 minutes on 2 CPU cores
    .venv/bin/python benchmarks/comm.py --out runs/comm                 # ~10 minutes on 2 CPU cores

Timing figures (b, c) are wall-clock on whatever else the machine runs: results.json and
results.md record the load average around each part, and (b) alternates its arms and reports
every repeat so a reader can judge the spread.

`--parts bytes,overhead,twonode` picks parts (default: all three; `--smoke` runs only `bytes`
unless told). The namespace part needs root and `ip netns`; without them it is skipped with the
reason in results.json. Output: OUT/results.json, OUT/results.md, OUT/comm_twonode.png, and
every run's own files under OUT/runs/. It exits non-zero if a launch fails or times out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _comm_netns import TwoNodes, netns_available, remove_stale
from _comm_report import (
    analyze_bytes,
    analyze_overhead,
    analyze_twonode,
    plot_twonode,
    write_markdown,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_comm_worker.py"
PARTS = ("bytes", "overhead", "twonode")
ALONE_INTERVAL = 10**6
"""`codistill.interval` of the "alone" arm: one exchange at step 0, none after."""


class LaunchFailed(RuntimeError):
    """A launched job exited non-zero or ran past its time limit; the message has its tail."""


@dataclass(frozen=True)
class Mode:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    micro_batch: int
    max_bytes: int
    # (a) bytes
    bytes_nproc: int
    bytes_steps: int
    bytes_topks: tuple[int, ...]
    bytes_routes: tuple[str, ...]
    # (b) overhead
    overhead_steps: int
    overhead_repeats: int
    overhead_skip: int
    """Leading steps left out of the step-time statistics (warm-up, the alone arm's exchange)."""
    # (c) two nodes
    rates: tuple[str, ...]
    sync_steps: int
    codistill_steps: int
    eval_interval: int
    val_batches: int
    """Validation micro-batches per rank of the 4-rank sync arm (codistill ranks score 2x)."""
    alone_steps: int
    """Steps of the 2-node "alone" arm at the slowest rate (0: no such arm)."""
    exchange_batch: int = 4
    staleness: int = 2
    ranks_per_node: int = 2
    """Ranks in each namespace; codistill puts one group per node (S = ranks_per_node)."""
    timeout_s: float = 900.0


MODEL = {"hidden_size": 96, "num_layers": 4, "num_heads": 4, "intermediate_size": 384,
         "seq_len": 64, "micro_batch": 4, "max_bytes": 2_000_000}
"""A 0.64M-parameter byte-level Llama: 2.6 MB of fp32 gradients per step (about 5.8 MB per
direction of the node link per ZeRO-2 step), a few hundred ms of compute per step here."""

MODES: dict[str, Mode] = {
    "smoke": Mode("smoke", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  seq_len=32, micro_batch=2, max_bytes=200_000,
                  bytes_nproc=2, bytes_steps=4, bytes_topks=(8, 0), bytes_routes=("leaders",),
                  overhead_steps=12, overhead_repeats=1, overhead_skip=2,
                  rates=("100mbit",), sync_steps=4, codistill_steps=4, eval_interval=2,
                  val_batches=1, alone_steps=0, ranks_per_node=1, exchange_batch=2,
                  timeout_s=300),
    "quick": Mode("quick", **MODEL,
                  bytes_nproc=4, bytes_steps=4, bytes_topks=(8, 32, 0),
                  bytes_routes=("leaders", "rails"),
                  overhead_steps=20, overhead_repeats=4, overhead_skip=4,
                  rates=("100mbit", "10mbit"), sync_steps=20, codistill_steps=40,
                  eval_interval=4, val_batches=2, alone_steps=0),
    "full": Mode("full", **MODEL,
                 bytes_nproc=4, bytes_steps=8, bytes_topks=(8, 32, 0),
                 bytes_routes=("leaders", "rails"),
                 overhead_steps=30, overhead_repeats=8, overhead_skip=4,
                 rates=("100mbit", "10mbit"), sync_steps=40, codistill_steps=80,
                 eval_interval=5, val_batches=2, alone_steps=30, timeout_s=1200),
}


def _sets(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]  # JSON is YAML


def base_sets(mode: Mode, **extra) -> dict:
    """Everything an arm shares: model, data, optimizer, ZeRO-2 in fp32 on CPU."""
    return {
        "seed": 1234,
        "model.arch": "llama", "model.hidden_size": mode.hidden_size,
        "model.num_layers": mode.num_layers, "model.num_heads": mode.num_heads,
        "model.intermediate_size": mode.intermediate_size, "model.max_seq_len": mode.seq_len,
        "data.seq_len": mode.seq_len, "data.max_bytes": mode.max_bytes,
        "data.micro_batch_size": mode.micro_batch, "data.val_batches": 1,
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.schedule": "constant",
        "optim.warmup_steps": 5, "optim.weight_decay": 0.05,
        "train.eval_interval": 0, "train.log_interval": 1,
        "backend.name": "deepspeed", "backend.ds_config": "ds_configs/zero2.json",
        "backend.precision": "fp32",
        "codistill.groups": 2, "codistill.topk": 32, "codistill.dtype": "bf16",
        "codistill.interval": 1, "codistill.staleness": 0, "codistill.alpha": 1.0,
        **extra,
    }


# ----------------------------------------------------------------------------- arms


def bytes_arms(mode: Mode, runs: Path, weights: bool) -> list[dict]:
    arms = []
    for route in mode.bytes_routes:
        for k in mode.bytes_topks:
            name = f"{route}-{'full' if k == 0 else f'top{k}'}"
            sets = base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.route": route,
                                      "codistill.topk": k})
            arms.append({"name": name, "kind": "codistill", "overrides": _sets(sets)})
    if mode.name != "smoke":  # async, stale, every 2 steps: the interval divides the bytes
        sets = base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.route": "leaders",
                                  "codistill.interval": 2, "codistill.staleness": 2,
                                  "codistill.async_exchange": True})
        arms.append({"name": "leaders-top32-interval2-async", "kind": "codistill",
                     "overrides": _sets(sets)})
    sets = base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.enabled": False,
                              "codistill.groups": 1})
    arms.append({"name": "sync-allreduce", "kind": "sync", "overrides": _sets(sets)})
    if weights:  # last: the only ZeRO-3 engine of the job
        arms.append({"name": "weights-interval2", "kind": "weights",
                     "overrides": _sets(weights_sets(mode))})
    for arm in arms:
        arm["run_dir"] = str(runs / "bytes" / arm["name"])
    return arms


def overhead_arms(mode: Mode, runs: Path) -> list[dict]:
    common = {"train.steps": mode.overhead_steps, "codistill.alpha": 0.0,
              "data.exchange_batch_size": mode.exchange_batch}
    kinds = {
        "alone": {"codistill.interval": ALONE_INTERVAL},
        "exchange-sync": {"codistill.staleness": 0},
        "exchange-async": {"codistill.staleness": mode.staleness, "codistill.async_exchange": True},
        "exchange-async-stale8": {"codistill.staleness": 8, "codistill.async_exchange": True},
        "exchange-async-alpha1": {"codistill.staleness": mode.staleness,
                                  "codistill.async_exchange": True, "codistill.alpha": 1.0},
        "exchange-async-interleaved": {"codistill.staleness": mode.staleness,
                                       "codistill.async_exchange": True,
                                       "codistill.interval": 2 * mode.staleness},
    }
    arms = []
    names = list(kinds)
    for rep in range(mode.overhead_repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no fixed position
        for kind in order:
            extra = kinds[kind]
            sets = base_sets(mode, **{**common, **extra})
            arms.append({"name": f"{kind}-r{rep}", "kind": kind, "repeat": rep,
                         "overrides": _sets(sets),
                         "run_dir": str(runs / "overhead" / f"{kind}-r{rep}")})
    return arms


def twonode_arms(mode: Mode, runs: Path) -> list[dict]:
    arms = []
    for rate in mode.rates:
        sync = base_sets(mode, **{
            "train.steps": mode.sync_steps, "train.eval_interval": mode.eval_interval,
            "data.val_batches": mode.val_batches, "codistill.enabled": False, "codistill.groups": 1})
        codi = base_sets(mode, **{
            "train.steps": mode.codistill_steps, "train.eval_interval": mode.eval_interval,
            "data.val_batches": 2 * mode.val_batches,  # half the ranks per model: same windows
            "data.exchange_batch_size": mode.exchange_batch, "codistill.route": "leaders",
            "codistill.staleness": mode.staleness, "codistill.async_exchange": True,
            "codistill.burn_in": 4, "codistill.ramp": 8})
        arms.append({"name": f"sync-{rate}", "kind": "sync", "rate": rate, "link": rate,
                     "overrides": _sets(sync)})
        arms.append({"name": f"codistill-{rate}", "kind": "codistill", "rate": rate,
                     "link": rate, "overrides": _sets(codi)})
    if mode.alone_steps:
        rate = mode.rates[-1]
        for kind, extra in (("alone", {"codistill.interval": ALONE_INTERVAL}),
                            ("exchange-async-stale8", {})):
            sets = base_sets(mode, **{
                "train.steps": mode.alone_steps, "codistill.alpha": 0.0,
                "data.exchange_batch_size": mode.exchange_batch, "codistill.staleness": 8,
                "codistill.async_exchange": True, **extra})
            arms.append({"name": f"{kind}-{rate}", "kind": f"overhead-{kind}", "rate": rate,
                         "link": rate, "overrides": _sets(sets)})
    for arm in arms:
        arm["run_dir"] = str(runs / "twonode" / arm["name"])
    return arms


# ----------------------------------------------------------------------------- launching


EXT_DIR = (Path.home() / ".cache" / "codistill-comm-bench" / "torch_extensions"
           / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])
"""A private JIT-extension cache for DeepSpeed's CPU comm op. The shared default
(~/.cache/torch_extensions) is rebuilt whenever a job from another virtualenv built it last,
under a file lock every DeepSpeed process on the machine waits for; a run that is stopped
mid-build leaves that lock behind and stalls everyone. Here only this benchmark waits."""

STALE_LOCK_S = 300.0


def clear_stale_locks() -> list[str]:
    """Remove build locks in EXT_DIR older than STALE_LOCK_S (left by a stopped launch)."""
    removed = []
    for lock in EXT_DIR.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:
            pass
    return removed


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(EXT_DIR))
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh(arms: list[dict]) -> None:
    for arm in arms:
        d = Path(arm["run_dir"])
        if d.exists():
            shutil.rmtree(d)  # metrics.jsonl is appended to: a stale one would mix two runs
        d.mkdir(parents=True)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the launched process groups (torchrun and its ranks), TERM then KILL."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _torchrun(nproc: int, job: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra,
            str(WORKER), str(job)]


def launch_local(name: str, arms: list[dict], nproc: int, out: Path, timeout_s: float) -> float:
    """All arms in one `torchrun --nproc_per_node nproc` job on loopback; returns wall seconds."""
    _fresh(arms)
    clear_stale_locks()
    job = out / f"job_{name}.json"
    job.write_text(json.dumps({"arms": arms}, indent=1))
    log = out / f"launch_{name}.log"
    cmd = _torchrun(nproc, job, ["--master_addr", "127.0.0.1", "--master_port", str(free_port())])
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop([proc])
            raise LaunchFailed(f"{name}: timed out after {timeout_s:.0f} s; log tail:\n{_tail(log)}") from None
        finally:
            _stop([proc])
    if rc != 0:
        raise LaunchFailed(f"{name}: exit code {rc}; log tail:\n{_tail(log)}")
    return time.perf_counter() - start


def launch_two_nodes(arms: list[dict], out: Path, timeout_s: float,
                     ranks_per_node: int) -> tuple[float, list[dict], dict]:
    """All arms in one 2-node job (`ranks_per_node` ranks per namespace); returns (wall s,
    link log, link info).

    Before each arm the worker's rank 0 files a request; this side sets the tbf rate on both
    veth ends, reads the byte counters, and acknowledges. The namespaces are removed on return,
    on error, on timeout and on SIGTERM/SIGINT/SIGHUP."""
    _fresh(arms)
    clear_stale_locks()
    link_dir = out / "link"
    if link_dir.exists():
        shutil.rmtree(link_dir)
    link_dir.mkdir(parents=True)
    job = out / "job_twonode.json"
    job.write_text(json.dumps({"arms": arms, "link_dir": str(link_dir)}, indent=1))
    first_rate = next((a["link"] for a in arms if a.get("link")), "100mbit")
    events: list[dict] = []
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    with TwoNodes(first_rate) as nodes:
        info = {"namespaces": list(nodes.ns), "veth": list(nodes.veth), "addrs": list(nodes.addrs),
                "qdisc": "tbf burst 64kb latency 50ms, both ends"}
        port = "29561"
        try:
            for node in (0, 1):
                extra = ["--nnodes", "2", "--node_rank", str(node), "--master_addr", nodes.addrs[0],
                         "--master_port", port]
                cmd = nodes.command(node, ["env", f"GLOO_SOCKET_IFNAME={nodes.veth[node]}",
                                           *_torchrun(ranks_per_node, job, extra)])
                log = out / f"launch_twonode_node{node}.log"
                logs.append(log)
                with open(log, "w") as fh:
                    fh.write(" ".join(cmd) + "\n")
                    fh.flush()
                    procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=fh,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            start = time.perf_counter()
            served = 0
            while True:
                req = link_dir / f"req_{served}.json"
                if req.exists():
                    ask = json.loads(req.read_text())
                    if ask.get("rate") and ask["rate"] != nodes.rate:
                        nodes.set_rate(ask["rate"])
                    events.append({"index": served, "rate": ask.get("rate") or nodes.rate,
                                   "t": time.perf_counter() - start, "counters": nodes.counters()})
                    (link_dir / f"ack_{served}").write_text("ok")
                    served += 1
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                if any(c not in (None, 0) for c in codes):
                    raise LaunchFailed(f"twonode: a node exited with {codes}; logs:\n"
                                       + "\n".join(f"--- {p}\n{_tail(p)}" for p in logs))
                if time.perf_counter() - start > timeout_s:
                    raise LaunchFailed(f"twonode: timed out after {timeout_s:.0f} s; logs:\n"
                                       + "\n".join(f"--- {p}\n{_tail(p)}" for p in logs))
                time.sleep(0.05)
            if any(p.returncode != 0 for p in procs):
                raise LaunchFailed("twonode: exit codes "
                                   f"{[p.returncode for p in procs]}; logs:\n"
                                   + "\n".join(f"--- {p}\n{_tail(p)}" for p in logs))
        finally:
            _stop(procs)
        wall = time.perf_counter() - start
    return wall, events, info


# ----------------------------------------------------------------------------- checks


def weights_mode_status(mode: Mode) -> dict:
    """Try `codistill.mode=weights` (ZeRO-3, as the mode requires) through the library's own
    validation, without launching anything: the bytes part measures it only if it validates."""
    from codistill_ds.config import ConfigError, load_config
    from codistill_ds.validation import validate

    cfg = load_config(None, _sets(weights_sets(mode)))
    try:
        validate(cfg, mode.bytes_nproc, 256)
    except ConfigError as err:
        return {"validates": False, "error": str(err), "skipped": True,
                "not_implemented": "not implemented" in str(err).lower()}
    return {"validates": True, "skipped": False}


def weights_sets(mode: Mode) -> dict:
    return base_sets(mode, **{"train.steps": mode.bytes_steps, "codistill.mode": "weights",
                              "codistill.interval": 2, "backend.ds_config": "ds_configs/zero3.json"})


def plan_1b() -> dict:
    """`codistill-ds plan --params 1B --json`, exactly as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "codistill_ds.cli", "plan", "--params", "1B", "--json"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        raise LaunchFailed(f"codistill-ds plan failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output dir: results.json, results.md, PNG, runs/")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny setting of the end-to-end test")
    size.add_argument("--quick", action="store_true", help="fewer steps and repeats (~6 minutes)")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} "
                                   "(default: all; --smoke: bytes)")
    p.add_argument("--rates", help="comma-separated tbf rates for twonode, e.g. 100mbit,10mbit")
    p.add_argument("--repeats", type=int, help="overhead repeats (default: the mode's)")
    return p.parse_args(argv)


def _terminate(signum, frame) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops the launched jobs."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rates:
        mode = replace(mode, rates=tuple(r.strip() for r in args.rates.split(",") if r.strip()))
    if args.repeats:
        mode = replace(mode, overhead_repeats=args.repeats)
    parts = [p.strip() for p in (args.parts or ("bytes" if args.smoke else ",".join(PARTS))).split(",")]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"comm: unknown parts {unknown}; valid: {', '.join(PARTS)}")
    out = Path(args.out).resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": asdict(mode), "parts": parts, "nproc_cpu": os.cpu_count(),
        "load_before": os.getloadavg(),
    }
    try:
        if "bytes" in parts:
            weights = weights_mode_status(mode)
            arms = bytes_arms(mode, runs, weights["validates"] and mode.name != "smoke")
            wall = launch_local("bytes", arms, mode.bytes_nproc, out, mode.timeout_s)
            results["bytes"] = analyze_bytes(arms, mode.bytes_nproc, plan_1b())
            results["bytes"]["weights_mode"] = weights
            results["bytes"]["launch_wall_s"] = wall
            print(f"[comm] bytes: {len(arms)} arms in {wall:.0f} s", flush=True)
        if "overhead" in parts:
            arms = overhead_arms(mode, runs)
            load = os.getloadavg()
            wall = launch_local("overhead", arms, 2, out, mode.timeout_s)
            results["overhead"] = analyze_overhead(arms, mode.overhead_skip)
            results["overhead"].update(launch_wall_s=wall, load_before=load, load_after=os.getloadavg())
            print(f"[comm] overhead: {len(arms)} arms in {wall:.0f} s", flush=True)
        if "twonode" in parts:
            ok, why = netns_available()
            if not ok:
                results["twonode"] = {"skipped": why}
                print(f"[comm] twonode skipped: {why}", flush=True)
            else:
                arms = twonode_arms(mode, runs)
                load = os.getloadavg()
                wall, events, info = launch_two_nodes(arms, out, mode.timeout_s, mode.ranks_per_node)
                results["twonode"] = analyze_twonode(arms, events, mode.overhead_skip,
                                                     mode.ranks_per_node)
                results["twonode"].update(launch_wall_s=wall, link=info, load_before=load,
                                          load_after=os.getloadavg())
                plot_twonode(results["twonode"], out / "comm_twonode.png")
                print(f"[comm] twonode: {len(arms)} arms in {wall:.0f} s", flush=True)
    except LaunchFailed as err:
        print(f"comm: {err}", file=sys.stderr, flush=True)
        (out / "results.partial.json").write_text(json.dumps(results, indent=1, default=str))
        return 1
    finally:
        remove_stale()
    results["wall_s"] = time.perf_counter() - start
    results["load_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = write_markdown(results)
    (out / "results.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
