"""Bytes per training token crossing the group boundary, like for like, for 125M to 70B models.

Every figure is `codistill_ds.plan.bytes.make_plan` (the formulas of `codistill-ds plan`), laid over
the same 2 groups of 8 ranks, one group per node or site: what leaves one node per step divided
by the training tokens one group consumes per step. Codistillation's rows assume every training
token is also exchanged (exchange batch = training batch, every step: `exchange_batch: train`);
a smaller exchange batch or a longer interval divides them further. Its bytes do not depend on
the model size; everyone else's grow with it.

    .venv/bin/python -m benchmarks.bytes_table --out runs/bytes-table

Writes OUT/results.json, OUT/results.md (the table) and OUT/bytes_per_token.png. The quality
effect of the compact wire formats is not measured here: the quality benchmark's compression
arms measure it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codistill_ds.distributed.launching import command_line
from codistill_ds.plan.bytes import make_plan

SHAPES = {  # name: (parameters, vocabulary, training tokens per step, both groups)
    "125M": (125 * 10**6, 50_257, 2**19),   # GPT-2 vocabulary; GPT-3 125M: 0.5M tokens
    "1B": (10**9, 32_000, 2**20),           # GPT-3 1.3B: 1M tokens
    "7B": (7 * 10**9, 32_000, 2**22),       # Llama 2 7B: 4M tokens
    "70B": (70 * 10**9, 32_000, 2**22),     # Llama 2 70B: 4M tokens
}
SEQ_LEN, GROUPS, WORLD = 2048, 2, 16

CODISTILL = {  # row: (topk, value dtype, token fraction)
    "codistill defaults (top-32, bf16 + uint16 ids)": (32, "bf16", 1.0),
    "codistill compact (top-1, fp8 + uint16 id + scale)": (1, "fp8", 1.0),
    "codistill compact, token_fraction 1/4": (1, "fp8", 0.25),
    "codistill top-4 fp8, token_fraction 1/4 (at the default's quality)": (4, "fp8", 0.25),
}
BASELINES = {
    "sync ring all-reduce (bf16 grads)": "ring",
    "sync hierarchical all-reduce (bf16 grads)": "hierarchical",
    "ZeRO-3 over all 16 ranks (bf16)": "zero3",
    "DiLoCo H=500, fp32 pseudo-gradient": "diloco_fp32",
    "DiLoCo H=500, bf16 pseudo-gradient": "diloco_bf16",
    "Streaming DiLoCo H=100, 4-bit": "streaming_diloco",
}


def _plan(params: int, vocab: int, tokens: int, topk: int = 32, dtype: str = "bf16",
          fraction: float = 1.0):
    per_group = tokens // GROUPS // SEQ_LEN  # sequences per group per step, all exchanged
    return make_plan(params, vocab, SEQ_LEN, per_group, topk, 1, GROUPS, WORLD, dtype=dtype,
                     token_fraction=fraction, train_batch=per_group)


def table() -> dict:
    """{row: {shape: bytes per training token}}, plus the published Streaming DiLoCo figure."""
    rows: dict[str, dict[str, float]] = {name: {} for name in (*BASELINES, *CODISTILL)}
    for shape, (params, vocab, tokens) in SHAPES.items():
        base = _plan(params, vocab, tokens)
        for name, key in BASELINES.items():
            rows[name][shape] = base.per_token[key]
        for name, (topk, dtype, fraction) in CODISTILL.items():
            rows[name][shape] = _plan(params, vocab, tokens, topk, dtype, fraction).per_token["codistill"]
    paper = base.streaming_diloco_paper_bytes_per_token
    return {"rows": rows, "streaming_diloco_paper_1b": paper, "goal_1b": paper / 10}


def markdown(result: dict) -> str:
    shapes = list(SHAPES)
    lines = ["| method | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for name, cells in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[s]:,.1f}" for s in shapes) + " |")
    lines.append(f"| Streaming DiLoCo as published (1B, 100B tokens, 4.42 TB) | - | "
                 f"{result['streaming_diloco_paper_1b']:.1f} | - | - |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names, shapes = list(result["rows"]), list(SHAPES)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - len(names) / 2) * width for j in range(len(shapes))]
        ax.bar(xs, [result["rows"][name][s] for s in shapes], width, label=name)
    ax.axhline(result["goal_1b"], color="black", ls="--", lw=0.8, label="goal at 1B (4.42 B/token)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("bytes per training token across the boundary")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bytes_table",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output dir: results.json, results.md, PNG")
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line("benchmarks.bytes_table"), "shapes": SHAPES,
              "seq_len": SEQ_LEN, "groups": GROUPS, "world": WORLD, **table()}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / "results.md").write_text(md)
    plot(result, out / "bytes_per_token.png")
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
