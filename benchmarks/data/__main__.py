"""Data benchmark: resident memory and time of one rank's data streams against corpus size,
token shards (`codistill-ds tokenize`, memory-mapped) against text tokenized in memory.

For each size, a synthetic-plus-real corpus (benchmarks/data/corpus.py: tinyshakespeare read by
path, then paragraphs of its words) is written under OUT, tokenized into 4M-token shards, and a
fresh process per path (benchmarks/data/probe.py) builds rank 0's training, exchange and
validation streams (2 groups x 2 ranks, seq_len 128, 8 sequences per rank) and draws STEPS
steps of batches. Reported per path and size: growth of VmRSS / RssAnon / VmHWM over the
process's state after imports, seconds to build the corpus, ms per step of batches, and that
both paths drew the same batches (checksum).

    .venv/bin/python -m benchmarks.data --out runs/data_memory                  # ~4 minutes here
    .venv/bin/python -m benchmarks.data --out runs/data_memory --sizes 2,20     # the test's sizes

Output: OUT/data_memory.json, OUT/data_memory.md and OUT/data_memory.png (copied to
benchmarks/data_memory.png with --publish).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from codistill_ds.data.tokenize import tokenize_files

from .corpus import make_corpus

HERE = Path(__file__).resolve().parent

PATHS = ("shards", "memory")


def probe(out: Path, source: Path, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-m", "benchmarks.data.probe", str(out), str(source), str(steps)], cwd=HERE.parents[1],
                   check=True, env=env, capture_output=True, timeout=1800)
    res = json.loads(out.read_text())
    res["grew_kb"] = {k: res["after"][k] - res["before"][k] for k in res["after"]}
    return res


def measure(out: Path, sizes_mb: list[int], steps: int) -> list[dict]:
    rows = []
    for mb in sizes_mb:
        text = make_corpus(out / f"corpus_{mb}mb.txt", mb * 1_000_000)
        shards = out / f"shards_{mb}mb"
        if shards.exists():
            shutil.rmtree(shards)
        tokenize_files([str(text)], str(shards), shard_tokens=4_000_000)
        got = {path: probe(out / f"probe_{path}_{mb}mb.json", shards if path == "shards" else text, steps)
               for path in PATHS}
        rows.append({"mb": mb, "windows": got["shards"]["windows"], "loadavg_1m": os.getloadavg()[0],
                     "same_batches": got["shards"]["checksum"] == got["memory"]["checksum"], **got})
        text.unlink()  # keep OUT small: the shards stay for inspection
        print(f"{mb} MB: " + ", ".join(f"{p} VmRSS +{got[p]['grew_kb']['VmRSS'] / 1024:.1f} MB" for p in PATHS),
              flush=True)
    return rows


def report(rows: list[dict], steps: int) -> str:
    head = ("| corpus | windows | path | VmRSS growth | RssAnon growth | VmHWM growth | build s | "
            f"ms/step ({steps} steps) | same batches | load avg |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        for p in PATHS:
            g = r[p]["grew_kb"]
            lines.append(f"| {r['mb']} MB | {r['windows']:,} | {p} | {g['VmRSS'] / 1024:.1f} MB | "
                         f"{g['RssAnon'] / 1024:.1f} MB | {g['VmHWM'] / 1024:.1f} MB | {r[p]['build_s']:.2f} | "
                         f"{r[p]['draw_s'] / steps * 1e3:.3f} | {r['same_batches']} | {r['loadavg_1m']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mbs = [r["mb"] for r in rows]
    for p, style in zip(PATHS, ("o-", "s--")):
        ax.plot(mbs, [r[p]["grew_kb"]["VmRSS"] / 1024 for r in rows], style, label=f"{p}: VmRSS growth")
        ax.plot(mbs, [r[p]["grew_kb"]["VmHWM"] / 1024 for r in rows], style, alpha=0.4, label=f"{p}: peak growth")
    ax.set_xlabel("corpus size (MB of text)")
    ax.set_ylabel("MB over the process after imports")
    ax.set_title("one rank's data streams: shards vs in-memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="2,5,10,20,40", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--publish", action="store_true", help="copy the PNG to benchmarks/data_memory.png")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(out, [int(s) for s in args.sizes.split(",")], args.steps)
    (out / "data_memory.json").write_text(json.dumps(rows, indent=1))
    (out / "data_memory.md").write_text(report(rows, args.steps))
    plot(rows, out / "data_memory.png")
    if args.publish:
        shutil.copy(out / "data_memory.png", HERE.parent / "data_memory.png")
    print(report(rows, args.steps))


if __name__ == "__main__":
    main()
