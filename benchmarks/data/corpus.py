"""A synthetic-plus-real text corpus of any size, made in a test's tmp dir (never committed).

The real part is tinyshakespeare, read by path; the rest is paragraphs of its words drawn with
a seeded RNG (about 1 line break in 8 words, a blank line in 50), so the file is a deterministic function of (size, seed)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


def make_corpus(path: Path, size: int, seed: int = 0) -> Path:
    """Write `size` bytes (ASCII) to `path`: tinyshakespeare first, then synthetic paragraphs."""
    real = SHAKESPEARE.read_text(encoding="utf-8")[:size]
    words = np.array(sorted(set(re.findall(r"[A-Za-z']+", real))))
    rng = np.random.default_rng(seed)
    n = max(0, size - len(real)) // 5 + 1  # words average ~7 bytes: enough to fill the rest
    drawn = words[rng.integers(0, len(words), size=n)]
    breaks = rng.random(n)
    seps = np.where(breaks < 0.02, "\n\n", np.where(breaks < 0.14, "\n", " "))
    synthetic = "".join(w + s for w, s in zip(drawn.tolist(), seps.tolist()))
    path.write_text((real + "\n\n" + synthetic)[:size], encoding="ascii")
    return path
