"""`python -m benchmarks.comm`: run the chosen parts, write results.json, results.md and the
two-node plot (see the package docstring for what each part measures)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from codistill_ds.distributed.launching import LaunchFailed, command_line

from . import __doc__ as PACKAGE_DOC
from .bytes import (
    COMPACT,
    analyze_bytes,
    bytes_arms,
    bytes_markdown,
    plan_1b,
    weights_mode_status,
)
from .common import MODES, Mode, launch_local
from .ftoverhead import ft_markdown, run_ft, select_cases
from .netns import netns_available, remove_stale
from .overhead import analyze_overhead, overhead_arms, overhead_markdown
from .twonode import (
    analyze_twonode,
    launch_two_nodes,
    plot_twonode,
    twonode_arms,
    twonode_markdown,
)

PARTS = ("bytes", "overhead", "twonode", "ft")
DEFAULT_PARTS = ("bytes", "overhead", "twonode")
"""`ft` (transport torchft against world, ftoverhead.py) runs only when named: 24 launches."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.comm",
                                description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output dir: results.json, results.md, PNG, runs/")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny setting of the end-to-end test")
    size.add_argument("--quick", action="store_true", help="fewer steps and repeats (~6 minutes)")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} "
                                   f"(default: {','.join(DEFAULT_PARTS)}; --smoke: bytes)")
    p.add_argument("--ft-cases", help="part ft: comma-separated case names or patterns, e.g. "
                                      "'K2S1I1ds,K.S2I10fsdp' (default: all 24)")
    p.add_argument("--ft-blocks", type=int, default=6, help="part ft: alternated blocks per arm at interval 1")
    p.add_argument("--rates", help="comma-separated tbf rates for twonode, e.g. 100mbit,10mbit")
    p.add_argument("--repeats", type=int, help="overhead repeats (default: the mode's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every arm, e.g. codistill.dtype=fp8 (recorded)")
    return p.parse_args(argv)


def _terminate(signum, frame) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops the launched jobs."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_bytes(mode: Mode, runs: Path, out: Path) -> dict:
    weights = weights_mode_status(mode)
    arms = bytes_arms(mode, runs, weights["validates"] and mode.name != "smoke")
    wall = launch_local("bytes", arms, mode.bytes_nproc, out, mode.timeout_s)
    result = analyze_bytes(arms, mode.bytes_nproc, plan_1b(), plan_1b(*COMPACT))
    result.update(weights_mode=weights, launch_wall_s=wall)
    print(f"[comm] bytes: {len(arms)} arms in {wall:.0f} s", flush=True)
    return result


def run_overhead(mode: Mode, runs: Path, out: Path) -> dict:
    arms = overhead_arms(mode, runs)
    load = os.getloadavg()
    wall = launch_local("overhead", arms, 2, out, mode.timeout_s)
    result = analyze_overhead(arms, mode.overhead_skip)
    result.update(launch_wall_s=wall, load_before=load, load_after=os.getloadavg())
    print(f"[comm] overhead: {len(arms)} arms in {wall:.0f} s", flush=True)
    return result


def run_twonode(mode: Mode, runs: Path, out: Path) -> dict:
    ok, why = netns_available()
    if not ok:
        print(f"[comm] twonode skipped: {why}", flush=True)
        return {"skipped": why}
    arms = twonode_arms(mode, runs)
    load = os.getloadavg()
    wall, events, info = launch_two_nodes(arms, out, mode.timeout_s, mode.ranks_per_node)
    result = analyze_twonode(arms, events, mode.overhead_skip, mode.ranks_per_node)
    result.update(launch_wall_s=wall, link=info, load_before=load, load_after=os.getloadavg())
    plot_twonode(result, out / "comm_twonode.png")
    print(f"[comm] twonode: {len(arms)} arms in {wall:.0f} s", flush=True)
    return result


def run_ft_part(mode: Mode, runs: Path, out: Path, args: argparse.Namespace) -> dict:
    load = os.getloadavg()
    result = run_ft(select_cases(args.ft_cases), args.ft_blocks, runs, mode.extra_sets, mode.timeout_s)
    result.update(load_before=load, load_after=os.getloadavg())
    return result


def write_markdown(results: dict) -> str:
    lines = [(f"Command: `{results['command']}` ({results['wall_s']:.0f} s, mode "
              f"{results['mode']['name']}, load average before {results['load_before'][0]:.1f}, "
              f"after {results['load_after'][0]:.1f} on {results['nproc_cpu']} CPUs)"), ""]
    if results.get("bytes"):
        lines += bytes_markdown(results["bytes"])
    if results.get("overhead"):
        lines += overhead_markdown(results["overhead"])
    c = results.get("twonode")
    if c and "skipped" in c:
        lines += ["", f"### (c) Two nodes: skipped ({c['skipped']})"]
    elif c:
        lines += twonode_markdown(c)
    if results.get("ft"):
        lines += ft_markdown(results["ft"])
    return "\n".join(lines) + "\n"


def _select(args: argparse.Namespace) -> tuple[Mode, list[str]]:
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rates:
        mode = replace(mode, rates=tuple(r.strip() for r in args.rates.split(",") if r.strip()))
    if args.repeats:
        mode = replace(mode, overhead_repeats=args.repeats)
    mode = replace(mode, extra_sets=tuple(args.set))
    parts = [p.strip() for p in (args.parts or ("bytes" if args.smoke else ",".join(DEFAULT_PARTS))).split(",")]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"comm: unknown parts {unknown}; valid: {', '.join(PARTS)}")
    return mode, parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    mode, parts = _select(args)
    out = Path(args.out).resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {"command": command_line("benchmarks.comm"), "mode": asdict(mode),
                     "parts": parts, "nproc_cpu": os.cpu_count(), "load_before": os.getloadavg()}
    steps = {"bytes": run_bytes, "overhead": run_overhead, "twonode": run_twonode,
             "ft": lambda m, r, o: run_ft_part(m, r, o, args)}
    try:
        for part in parts:
            results[part] = steps[part](mode, runs, out)
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
