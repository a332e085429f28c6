"""Several runs on one set of ranks: `WORKER OUT CONFIG [overrides...] @NAME [overrides...]
[@NAME [overrides...]]...`. Starting a rank (torch, DeepSpeed, the process group) costs seconds
of CPU and a tiny run milliseconds, so a test that needs several runs of the same world starts
its ranks once; each run sees the shared overrides then its own and writes under OUT/NAME.
Without an `@NAME` a worker does one run and writes under OUT itself. (Not `--run NAME`:
torchrun's argument parser would take `--run` for an abbreviation of its own `--run-path`.)"""

from __future__ import annotations

from pathlib import Path

MARK = "@"


def is_multi(args: list[str]) -> bool:
    return any(a.startswith(MARK) for a in args)


def split_runs(out: Path, args: list[str]) -> list[tuple[Path, list[str]]]:
    """[(out dir, overrides)] per run, in order; the dirs exist."""
    starts = [i for i, a in enumerate(args) if a.startswith(MARK)]
    if not starts:
        runs = [(out, list(args))]
    else:
        common = args[: starts[0]]
        runs = [(out / args[i][len(MARK):], [*common, *args[i + 1:end]])
                for i, end in zip(starts, [*starts[1:], len(args)])]
        assert all(path != out for path, _ in runs) and len({p for p, _ in runs}) == len(runs), args
    for path, _ in runs:
        path.mkdir(parents=True, exist_ok=True)
    return runs
