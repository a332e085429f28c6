"""Token sampling for the exchange: fewer positions and sampled targets, both unbiased.

Top-k on every position of the exchange batch costs k (value + id) bytes per token; two
independent knobs go below that (docs/design.md "Counting bytes honestly"):

1. **Positions** (`codistill.token_fraction` f): predictions travel for m = round(f L) positions
   of each length-L sequence. The positions are a pseudo-random draw keyed by (seed, exchange
   index, sequence row), so every group derives the same ones and nothing but predictions
   crosses groups. Each position is kept with probability m / L, so the distillation term over
   the kept positions is an unbiased estimate of its mean over all positions; bytes scale by m/L.
2. **Sampled targets** (kind "samples"): instead of the teacher's top-k, n ids drawn from the
   teacher's distribution at temperature T, with their log-probabilities. Anshumann et al.
   (ACL 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs") show top-k
   targets bias the student (the tail's shape is lost), while sampled ones give an unbiased
   estimate of the full-vocabulary KL and its gradient; `losses.py` holds the estimator. The
   payload has the same layout as top-k (`compression.WireFormat`, kind "samples").

Both are library pieces: the exchange engine decides when to call them.
"""

from __future__ import annotations

import hashlib

import torch

from codistill_ds.exchange.wire import (
    CompressedLogits,
    WireFormat,
    check_whole_vocabulary,
    choose_index_dtype,
    to_wire_values,
)


def positions_per_sequence(seq_len: int, fraction: float) -> int:
    """m = round(fraction * seq_len), at least 1: how many positions of a sequence travel."""
    if seq_len < 1 or not 0.0 < fraction <= 1.0:
        raise ValueError(f"need seq_len >= 1 and 0 < fraction <= 1, got {seq_len}, {fraction}")
    return max(1, round(fraction * seq_len))


def draw_seed(*keys: object) -> int:
    """A 63-bit generator seed from a tuple of keys (seed, exchange index, row, ...).

    A hash, not arithmetic on the keys: neighbouring (exchange, row) pairs must not share draws;
    and not Python's `hash`, which is salted per process for strings and would differ between
    ranks and runs."""
    digest = hashlib.blake2b(":".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def select_positions(seed: int, exchange: int, rows: range, seq_len: int,
                     fraction: float) -> torch.Tensor:
    """[len(rows), m] int64 positions, ascending within each row, for exchange batch rows `rows`.

    `rows` are global row numbers of the exchange batch, so a rank that holds rows [8, 12) and
    its rail counterparts in other groups derive the same positions without communicating."""
    m = positions_per_sequence(seq_len, fraction)
    out = torch.empty(len(rows), m, dtype=torch.long)
    for i, row in enumerate(rows):
        g = torch.Generator().manual_seed(draw_seed(seed, exchange, row))
        out[i] = torch.randperm(seq_len, generator=g)[:m].sort().values
    return out


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] at `positions` [B, m] -> [B * m, ...]: rows in (sequence, position) order,
    the order `compress` and the losses expect for a flattened batch."""
    if x.dim() < 2 or positions.dim() != 2 or positions.shape[0] != x.shape[0]:
        raise ValueError(f"need x [B, L, ...] and positions [B, m], got {tuple(x.shape)} and "
                         f"{tuple(positions.shape)}")
    idx = positions.to(x.device)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx).flatten(0, 1)


def sample_targets(logits: torch.Tensor, num_samples: int, temperature: float,
                   value_dtype: str = "bf16", index_dtype: str = "auto",
                   generator: torch.Generator | None = None) -> CompressedLogits:
    """Draw `num_samples` ids per token from softmax(logits / T), with replacement.

    Returns a kind-"samples" payload: ids in draw order, values = the teacher's log-probability
    of each drawn id (rounded as the wire will round them). Bytes per token:
    num_samples x (value + id bytes), whatever the vocabulary."""
    check_whole_vocabulary(logits, "sample_targets")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[1]
    fmt = WireFormat(num_samples, value_dtype, choose_index_dtype(index_dtype, vocab), "samples", vocab)
    with torch.no_grad():
        log_p = torch.log_softmax(logits.detach().float() / temperature, dim=-1)
        ids = torch.multinomial(log_p.exp(), num_samples, replacement=True, generator=generator)
        values = to_wire_values(log_p.gather(-1, ids), value_dtype)
    return CompressedLogits(values, ids.to(torch.int32).contiguous(), "samples", fmt)
