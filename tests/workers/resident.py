"""Resident memory of this process from /proc/self/status, for the memory checks' workers:
peaks are read as VmHWM after resetting it (clear_refs 5), so a check sees the rise a build
causes, not what the process held before."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch.distributed as dist


def status(key: str) -> int:
    """One /proc/self/status figure (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> int:
    """Reset VmHWM to the current resident set; returns that resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def measure(build: Callable[[], object]) -> dict:
    """Peak rise of resident memory while `build()` runs, what stays while its result lives,
    and what is left once it is dropped (every rank between barriers: the ranks measure the
    same phase)."""
    gc.collect()
    dist.barrier()
    before = reset_peak()
    model = build()
    peak, kept = status("VmHWM") - before, status("VmRSS") - before
    del model
    gc.collect()
    dist.barrier()
    return {"peak": peak, "kept": kept, "residue": status("VmRSS") - before}
