"""The end of a run: per-group results gathered from every rank, summary.json and the table.

`summarize` is a collective over the job (the table needs every group on rank 0); the table is
what `make demo` prints, and the README quotes it (tests/dist/test_demo_readme.py checks the
quote against a fresh run).
"""

from __future__ import annotations

import torch

from codistill_ds.config import Config
from codistill_ds.distributed import comm


def summarize(cfg: Config, topology, loop, state, n_params: int, wall_s: float) -> dict:
    """Per-group results gathered from every rank (the table needs all groups on rank 0)."""
    mine = {
        "rank": topology.rank, "group": topology.group_id,
        "cross_group_bytes": loop.cross_group_bytes(),
        "last": state.last, "best_val_loss": state.best_val, "val_history": state.val_history,
        "peak_memory_bytes": peak_memory_bytes(),
    }
    everyone = comm.all_gather_object(mine)
    groups = []
    for g in sorted({r["group"] for r in everyone}):  # one group per job under transport torchft
        ranks = [r for r in everyone if r["group"] == g]
        lead = ranks[0]
        groups.append({
            "group": g,
            "final_loss": lead["last"].get("loss"),
            "final_val_loss": lead["last"].get("val_loss"),
            "best_val_loss": lead["best_val_loss"],
            "agreement": lead["last"].get("agreement"),
            "cross_group_bytes": sum(r["cross_group_bytes"] for r in ranks),
            "cross_group_bytes_per_rank": [r["cross_group_bytes"] for r in ranks],
            "tokens": lead["last"].get("tokens"),
            "val_history": lead["val_history"],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        })
    return {
        "world_size": topology.dims.world_size, "groups": topology.groups,
        "ranks_per_group": topology.group_size, "params": n_params, "steps": cfg.train.steps,
        "wall_s": wall_s, "backend": cfg.backend.name, "route": cfg.codistill.route,
        "codistill": loop.codistill, "per_group": groups,
        "compute_dtype": str(getattr(loop.backend, "compute_dtype", None)),  # of the last forward
    }


def peak_memory_bytes() -> int:
    """This rank's peak: CUDA memory allocated by PyTorch on a GPU, else the process's peak
    resident set (what `make gpu-check` and the memory estimate of `plan` are compared with)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_table(summary: dict) -> str:
    """The end-of-run table: one row per group."""
    head = f"{'group':>5} {'train loss':>10} {'val loss':>9} {'best val':>9} {'agree':>6} {'x-group bytes':>14}"
    rows = [head, "-" * len(head)]
    num = lambda x, spec: "-" if x is None else format(x, spec)
    for g in summary["per_group"]:
        rows.append(f"{g['group']:>5} {num(g['final_loss'], '.4f'):>10} {num(g['final_val_loss'], '.4f'):>9} "
                    f"{num(g['best_val_loss'], '.4f'):>9} {num(g['agreement'], '.3f'):>6} {g['cross_group_bytes']:>14,}")
    rows.append(f"{summary['groups']} groups x {summary['ranks_per_group']} ranks, "
                f"{summary['params']:,} params, {summary['steps']} steps, {summary['wall_s']:.1f}s")
    return "\n".join(rows)


