"""Critical batch of the benchmark's model, one pass over the built-in standard-library corpus.

Synchronous training at a ladder of global batches G (sequences of 128 bytes), one process
per run (the data-parallel job at global batch G, on one core), each batch's learning rate
searched on a grid, each run stopped at the lowest target validation loss: steps and tokens to
each target per batch, McCandlish et al.'s fit S = S_min + E_min / B (B_crit = E_min / S_min),
and the gradient noise scale B_simple measured in the loop (two-batch estimator).

    .venv/bin/python -m benchmarks.onepass --smoke --out runs/onepass-smoke   # seconds: the test
    .venv/bin/python -m benchmarks.onepass --quick --out runs/onepass-quick   # the quick model's ladder
    .venv/bin/python -m benchmarks.onepass --quick --out runs/onepass-quick --probe 32,256
        # one whole pass at the first-guess learning rate, no target: timing, reachable loss
    .venv/bin/python -m benchmarks.onepass --quick --out runs/onepass-quick --report
        # rewrite the results from the runs so far (also while the ladder is running)

Resumable: every run is OUT/runs/NAME.json (rewritten at each evaluation); a rerun reuses the
finished ones with equal settings. OUT/results.{json,md} and OUT/onepass.png are rewritten
after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from codistill_ds.distributed.launching import command_line

from . import report
from .ladder import Ladder, probe
from .settings import BASE_SEED, MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onepass", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny model and corpus: seconds (the test)")
    size.add_argument("--quick", action="store_true", help="the quality benchmark's quick-mode model (default)")
    size.add_argument("--full", action="store_true", help="the quality benchmark's full-size model")
    p.add_argument("--batches", help="comma-separated global batches (default: the mode's ladder)")
    p.add_argument("--targets", help="comma-separated target validation losses (default: the mode's)")
    p.add_argument("--seed", type=int, default=BASE_SEED)
    p.add_argument("--probe", help="comma-separated batches: one pass each at the first-guess lr, no target")
    p.add_argument("--report", action="store_true",
                   help="train nothing: rewrite OUT/results.* from the runs OUT/runs holds (finished or not)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    mode = MODES["smoke" if args.smoke else "full" if args.full else "quick"]
    if args.targets:
        mode = replace(mode, targets=tuple(float(x) for x in args.targets.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe:
        recs = probe(mode, out, args.seed, [int(x) for x in args.probe.split(",")])
        for r in recs:
            ev = r["evals"]
            print(f"probe G={r['spec']['batch']} lr={r['spec']['lr']:g}: {r['steps_run']} steps, "
                  f"{r['tokens_per_s']:.0f} tok/s, val " + ", ".join(
                      f"{e['val_loss']:.3f}@{e['tokens'] / 1e6:.2f}M" for e in ev[:: max(1, len(ev) // 12)]))
        return 0
    batches = [int(x) for x in args.batches.split(",")] if args.batches else list(mode.batches)
    command = command_line("benchmarks.onepass")
    if args.report:
        recs = [r for r in (json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json")))
                if r["spec"]["mode"] == mode.name and r["spec"]["batch"] in batches and r.get("steps_run")]
        print(report.write(report.summarize(recs, mode, command), out), flush=True)
        return 0

    def rewrite() -> None:
        report.write(report.summarize(ladder.records(), mode, command), out)

    ladder = Ladder(mode, out, args.seed, batches, on_run=rewrite)
    ladder.search()
    res = report.summarize(ladder.records(), mode, command)
    print(report.write(res, out), flush=True)
    print(json.dumps({t: f for t, f in res["fit"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
