"""Counts and byte sizes as `codistill-ds plan` reads and prints them (decimal units: 1 KB = 1,000 B)."""

from __future__ import annotations

import argparse
import re

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def human_bytes(n: float) -> str:
    """Decimal units: 1 KB = 1,000 bytes."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def human_count(n: float) -> str:
    """1.05e9 -> '1.05B' (parameters)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"


def parse_count(text: str) -> int:
    """'1e9', '1B', '1.5b', '350M', '125m', '10k', '1_100_000' -> an integer count."""
    match = re.fullmatch(r"\s*([0-9_.]+(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a count (e.g. 1B, 350M, 1e9)")
    try:
        number = float(match.group(1).replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a count") from None
    return round(number * _SUFFIX[match.group(2).lower()])
