"""Quality benchmark: 2-group codistillation against synchronous data parallelism and DiLoCo.

docs/design.md's quality targets, in the seed paper's regime (Sodhani et al., arXiv 2010.02838: equal
updates per rank, many passes over a limited corpus, every arm trained past its best validation
loss): 2-group codistillation's best validation loss at most 1% above synchronous
all-reduce's, below independent training, and at or below torchft's DiLoCo at H from 10 to 100.
Every arm trains a byte-level Llama on 2 ranks, with the same per-rank batch b, schedule and
validation windows:

    sync                  1 group x 2 ranks, ordinary data parallel, global batch 2b: the baseline
    codistill             2 groups x 1 rank (batch b each), peers' logits every step, with the
                          regularization adjustment (weight decay 0.1 -> 0.01, config only)
    independent           as codistill, alpha = 0: what the distillation term itself buys
    diloco-hH             torchft DiLoCo, 2 workers of 1 rank on the codistill groups' halves,
                          outer Nesterov (lr 0.7, momentum 0.9) every H inner steps (diloco.py)
    codistill-*           variants: wire formats (compression), stale peers, the token-limited
                          attempts (settings.py lists them all)

Codistill arms use `codistill.exchange_batch=train` (docs/design.md's reference setting, "fresh peer
predictions on each model's own batch"): each model trains on its own half of the corpus and its
peer predicts on that same batch. Regimes (settings.py): shakespeare (data-limited), compression,
token (one pass, token-limited), stdlib (data-limited, another kind of text), hetero (a small
and a large model, hetero.py).

    .venv/bin/python -m benchmarks.quality --data ../shared/data/tinyshakespeare.txt \\
        --out runs/quality-smoke --smoke      # every kind of arm, tiny: the end-to-end test
    .venv/bin/python -m benchmarks.quality --data ../shared/data/tinyshakespeare.txt \\
        --out runs/quality-quick --quick      # every regime, a quarter-size model
    .venv/bin/python -m benchmarks.quality --data ../shared/data/tinyshakespeare.txt \\
        --out runs/quality [--regimes shakespeare,compression]   # full: hours on 2 CPU cores

Run from the checkout root. Resumable: each run's records stay under OUT/REGIME/runs/ARM-sSEED/,
and a rerun with the same settings reuses the runs that finished (--rerun trains them again).
After each arm, OUT/REGIME/results.json and results.md are rewritten, and OUT/quality.png
(one column per regime). A failing run stops the benchmark with its logs' tail.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path

from codistill_ds.distributed.launching import command_line

from . import bill, corpora, diloco, hetero
from .plots import plot_onepass, plot_regimes
from .report import summarize_arm, write_reports
from .runner import Run, RunFailed, Starter, cli_starter, run_once
from .settings import (
    ARMS,
    BASE_SEED,
    MODES,
    NPROC,
    Arm,
    Mode,
    Regime,
    arm_overrides,
    arm_settings,
    check_windows,
    one_pass_steps,
    regime_arms,
    seeds_of,
    with_seeds,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="text corpus (read by path, byte-level): tinyshakespeare")
    p.add_argument("--out", required=True, help="output dir: REGIME/results.{json,md}, quality.png")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny setting of the end-to-end test")
    size.add_argument("--quick", action="store_true", help="a quarter-size model, minutes per arm")
    p.add_argument("--regimes", help="comma-separated regimes (default: all of the mode's)")
    p.add_argument("--arms", help="comma-separated arms to run in each regime (default: the regime's)")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: the regime's)")
    p.add_argument("--steps", type=int, help="updates per rank (default: the regime's cap)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every arm (experiments; recorded in results.json)")
    p.add_argument("--rerun", action="store_true", help="train finished runs again")
    p.add_argument("--run-timeout-s", type=float,
                   help="each run's time limit, and the DiLoCo workers' collective timeout (default: the "
                        "regime's or mode's); not part of a run's identity")
    return p.parse_args(argv)


def kind_of(arm: Arm) -> str:
    return "diloco" if arm.diloco else "codistill" if arm.codistill else "sync"


def starter_of(arm: Arm, mode: Mode, regime: Regime, seed: int, files: list[str],
               args: argparse.Namespace) -> tuple[list[str], Starter, int]:
    """(the run's identifying overrides, how to start it, how many models it trains)."""
    def sets_of(a: Arm) -> list[str]:
        return arm_overrides(a, mode, regime, seed, files, args.steps) + args.set

    sets = sets_of(arm)
    if arm.diloco:
        return sets, diloco.starter(sets, arm.diloco, args.run_timeout_s or 600.0), 2
    if arm.special == "pair":
        # The faster (small) group waits for the slower at every round: lockstep exchange.
        by_group = [sets_of(replace(arm, small=small)) + ["codistill.join_timeout_s=600"]
                    for small in (False, True)]
        return by_group[0] + by_group[1], hetero.pair_starter(by_group), 2
    if arm.special == "offline":
        batch = 2 * mode.micro_batch  # the teacher is sync on one rank: its global batch
        teacher = sets_of(ARMS["sync"]) + [f"data.micro_batch_size={batch}",
                                           f"data.val_batches={regime.val_windows // batch}"]
        return teacher + sets, hetero.offline_starter(teacher, sets), 1
    return sets, cli_starter(sets, NPROC), 2 if arm.codistill else 1


def run_one(arm: Arm, seed: int, mode: Mode, regime: Regime, files: list[str], args: argparse.Namespace,
            out: Path) -> Run:
    """One seed of one arm, as a resumable run."""
    sets, start, models = starter_of(arm, mode, regime, seed, files, args)
    run = run_once(out / "runs" / f"{arm.name}-s{seed}", arm_settings(arm, sets), start,
                   args.run_timeout_s or regime.timeout_s or mode.run_timeout_s, regime.stop, models, args.rerun,
                   reuse_root=out.parent)
    print(f"  {regime.name}/{arm.name} seed {seed}: {run.brief()}", flush=True)
    return run


def run_regime(mode: Mode, regime: Regime, args: argparse.Namespace, out: Path) -> None:
    """Train (or reuse) every arm of a regime, first seeds first (a partial run already covers
    every arm), rewriting the regime's report after each run."""
    files = corpora.train_files(regime.corpus, args.data, out.parent, regime.max_bytes)
    arms = regime_arms(regime, args.arms.split(",") if args.arms else None)
    split = None
    if not regime.steps:  # one pass: as many updates as the training split holds for sync at 2b
        split = corpora.split_windows(arm_overrides(ARMS["sync"], mode, replace(regime, steps=1), 0, files))
        regime = one_pass_steps(regime, mode, split[0])
        print(f"quality: {regime.name}: {split[0]:,} training windows, one pass = {regime.steps} updates",
              flush=True)
    check_windows(mode, regime, arms, corpora.corpus_chars(files, regime.max_bytes), split)
    previous = out / "results.json"
    kept = json.loads(previous.read_text())["arms"] if previous.exists() and args.arms else {}
    results = {"command": command_line("benchmarks.quality"), "mode": mode.name,
               "regime": {**asdict(regime), "stop": str(regime.stop)}, "model": asdict(mode.model),
               "extra_sets": args.set, "data": args.data}
    runs: dict[str, list[Run]] = {}
    # One-pass regimes report each arm's compute bill (bill.py): counted from its overrides.
    counted = {a.name: bill.counted(starter_of(a, mode, regime, BASE_SEED, files, args)[0], a.diloco, NPROC)
               for a in arms} if regime.lr else {}
    jobs = [(i, arm, seed) for arm in arms for i, seed in enumerate(seeds_of(arm, regime))]
    for _, arm, seed in sorted(jobs, key=lambda job: job[0]):
        runs.setdefault(arm.name, []).append(run_one(arm, seed, mode, regime, files, args, out))
        done = {a.name: summarize_arm(runs[a.name], kind_of(a), a.note, counted.get(a.name))
                for a in arms if a.name in runs}
        text = write_reports({**results, "arms": _ordered({**kept, **done})}, out)
    print(text, flush=True)


def _ordered(arms: dict) -> dict:
    order = list(ARMS)
    return dict(sorted(arms.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def plot_all(out: Path, names: list[str]) -> None:
    found = [json.loads((out / n / "results.json").read_text()) for n in names
             if (out / n / "results.json").exists()]
    onepass = [r for r in found if "onepass" in r]
    others = [r for r in found if "onepass" not in r]
    if others:
        plot_regimes(others, out / "quality.png")
    if onepass:
        plot_onepass(onepass, out / "onepass.png")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the running launch is taken down with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    names = args.regimes.split(",") if args.regimes else list(mode.regimes)
    unknown = [n for n in names if n not in mode.regimes]
    if unknown:
        raise SystemExit(f"quality: unknown regimes {unknown} in mode {mode.name}; valid: {', '.join(mode.regimes)}")
    out = Path(args.out)
    for name in names:
        regime = with_seeds(mode.regimes[name], args.seeds)
        print(f"quality: regime {name}", flush=True)
        try:
            run_regime(mode, regime, args, out / name)
        except RunFailed as err:
            print(f"quality: {err}", file=sys.stderr, flush=True)
            return 1
        plot_all(out, list(mode.regimes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
