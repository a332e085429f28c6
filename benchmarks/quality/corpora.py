"""The text each regime trains on, as the `data.train_files` every arm of the regime receives.

The texts are read by path or generated into the output directory, never copied into the repo:
- "text": the --data file (tinyshakespeare), first `max_bytes`;
- "stdlib": the library's built-in corpus (the installed Python standard library's source);
- "mixed": tinyshakespeare and standard-library source interleaved in 4 KB pieces, equal
  shares. The validation split is the corpus's tail (data.py), so interleaving is what makes
  it hold both kinds of text: concatenated, the tail would be one corpus only.
"""

from __future__ import annotations

import os
from pathlib import Path

from codistill_ds.data.sources import stdlib_sources

PIECE = 4096
"""Characters per interleaved piece: 32 sequences of 128 bytes, so the first validation windows
already alternate between the two texts."""


def write_mixed(text_path: str, out: Path, max_bytes: int) -> Path:
    """`out`: pieces of the text file and of the stdlib source alternating, max_bytes in all
    (half each). Deterministic, so a rerun writes the same file and its runs can be reused."""
    half = max_bytes // 2
    text = Path(text_path).read_text(encoding="utf-8")[:half]
    code = "\n".join(stdlib_sources(half))[:half]
    if len(text) < half or len(code) < half:
        raise SystemExit(f"quality: mixed corpus of {max_bytes:,} chars needs {half:,} of each text; "
                         f"{text_path} has {len(text):,}, the stdlib source {len(code):,}")
    pieces = [p for i in range(0, half, PIECE) for p in (text[i:i + PIECE], code[i:i + PIECE])]
    body = "".join(pieces)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text(encoding="utf-8") != body:
        out.write_text(body, encoding="utf-8")
    return out


def train_files(corpus: str, data: str, out: Path, max_bytes: int) -> list[str]:
    """`data.train_files` of a regime (an empty list selects the built-in corpus)."""
    if corpus == "text":
        return [os.path.abspath(data)]
    if corpus == "stdlib":
        return []
    if corpus == "mixed":
        return [str(write_mixed(data, out / "corpora" / f"mixed-{max_bytes}.txt", max_bytes).resolve())]
    raise ValueError(f"unknown corpus kind {corpus!r}")


def corpus_chars(files: list[str], max_bytes: int | None) -> int:
    """Characters the run will tokenize (bytes = tokens for the ASCII texts used here; None: no cap)."""
    cap = max_bytes if max_bytes is not None else 1 << 62
    if not files:
        return min(cap, sum(len(t) + 1 for t in stdlib_sources(max_bytes)))
    return min(cap, sum(os.path.getsize(f) for f in files))


def split_windows(sets: list[str]) -> tuple[int, int]:
    """(training, held-out) windows of the corpus a run's overrides describe, tokenized exactly
    as the run will (the one-pass regimes size their updates from it)."""
    from codistill_ds.config import load_config
    from codistill_ds.data.corpus import build_corpus

    corpus = build_corpus(load_config(None, sets).data)
    return len(corpus.train), len(corpus.val)
