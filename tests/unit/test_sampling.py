"""Token sampling (codistill_ds/exchange/sampling.py): shared positions and unbiased sampled targets,
checked against float64 references and the full-vocabulary KL."""

from __future__ import annotations

import pytest
import torch

from codistill_ds.exchange.losses import distill_loss
from codistill_ds.exchange.sampling import (
    gather_positions,
    positions_per_sequence,
    sample_targets,
    select_positions,
)
from codistill_ds.exchange.wire import compress, pack


def _logits(n: int, v: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def test_positions_are_shared_deterministic_and_well_formed() -> None:
    seq_len, f = 64, 0.125
    m = positions_per_sequence(seq_len, f)
    assert m == 8 and positions_per_sequence(64, 1.0) == 64 and positions_per_sequence(64, 0.001) == 1
    whole = select_positions(7, 3, range(8), seq_len, f)
    # A rank holding rows 4..7 (and its rail peers in every group) derives the same rows.
    assert torch.equal(select_positions(7, 3, range(4, 8), seq_len, f), whole[4:])
    assert torch.equal(select_positions(7, 3, range(8), seq_len, f), whole)
    assert not torch.equal(select_positions(7, 4, range(8), seq_len, f), whole)
    assert not torch.equal(select_positions(8, 3, range(8), seq_len, f), whole)
    assert whole.shape == (8, m) and whole.dtype == torch.long
    for row in whole:
        assert torch.all(row[1:] > row[:-1]) and 0 <= row.min() and row.max() < seq_len
    assert len({tuple(r.tolist()) for r in whole}) == 8  # rows draw independently
    assert torch.equal(select_positions(1, 0, range(2), 16, 1.0), torch.arange(16).repeat(2, 1))


def test_every_position_is_kept_with_probability_m_over_l() -> None:
    """Uniform inclusion is what makes the kept-position loss an unbiased per-token mean."""
    seq_len, f, draws = 16, 0.25, 2000
    pos = select_positions(11, 0, range(draws), seq_len, f)
    freq = torch.bincount(pos.flatten(), minlength=seq_len).double() / draws
    se = (0.25 * 0.75 / draws) ** 0.5
    assert torch.all((freq - 0.25).abs() < 4 * se), freq


def test_gather_positions_matches_indexing() -> None:
    x = torch.randn(3, 10, 5)
    pos = select_positions(0, 1, range(3), 10, 0.3)
    got = gather_positions(x, pos)
    expected = torch.stack([x[b, p] for b in range(3) for p in pos[b].tolist()])
    assert torch.equal(got, expected)
    labels = torch.arange(30).view(3, 10)
    assert torch.equal(gather_positions(labels, pos), torch.cat([labels[b, pos[b]] for b in range(3)]))


def test_sampled_payload_format_and_wire() -> None:
    z = _logits(6, 300, seed=1)
    t = sample_targets(z, 4, 1.5, "bf16", generator=torch.Generator().manual_seed(0))
    fmt = t.wire_format()
    assert (t.kind, fmt.kind, fmt.index_dtype, fmt.k) == ("samples", "samples", "uint16", 4)
    assert fmt.bytes_per_token == 4 * (2 + 2) and pack(t).numel() == 6 * 16
    back = fmt.unpack(pack(t), 6)
    assert torch.equal(back.indices, t.indices) and torch.equal(back.values, t.values)
    exact = sample_targets(z, 4, 1.5, "fp32", generator=torch.Generator().manual_seed(0))
    log_p = torch.log_softmax(z / 1.5, dim=-1)
    assert torch.equal(exact.values, log_p.gather(-1, exact.indices.long()))
    assert torch.equal(t.top1(), exact.indices.gather(-1, exact.values.argmax(-1, keepdim=True)).squeeze(-1).long())
    with pytest.raises(ValueError, match="forward KL only"):
        distill_loss(z, t, "jsd", 1.5)


def _kl(zt: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(zt.double() / temperature, -1)
    log_q = torch.log_softmax(s.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_sampled_kl_is_unbiased_where_topk_is_not() -> None:
    """E[estimate] = T^2 KL(p || q) over the full vocabulary: the estimate lands within 4
    standard errors of it, while top-4 buckets sit many standard errors below (their bias)."""
    n_tok, vocab, n, temp = 4, 50, 40_000, 1.5
    zt, s = _logits(n_tok, vocab, 2, scale=1.5), _logits(n_tok, vocab, 3, scale=1.5)
    target = sample_targets(zt, n, temp, "fp32", generator=torch.Generator().manual_seed(5))
    got = distill_loss(s, target, "kl", temp).double()
    exact = temp ** 2 * _kl(zt, s, temp).mean()
    log_q = torch.log_softmax(s.double() / temp, -1).gather(-1, target.indices.long())
    terms = temp ** 2 * (target.values.double() - log_q)  # per draw, [N, n]
    se = (terms.var(dim=-1) / n).sum().sqrt() / n_tok
    assert abs(got - exact) < 4 * se, (got, exact, se)
    topk = distill_loss(s, compress(zt, 4, torch.float32, "logprobs", temp), "kl", temp).double()
    assert exact - topk > 10 * se  # bucketing hides the within-tail divergence


def test_sampled_kl_gradient_is_unbiased() -> None:
    """The gradient's expectation is the full KL gradient T (q - p) / N; per coordinate the
    draw count c/n has standard error sqrt(p (1 - p) / n)."""
    n_tok, vocab, n, temp = 3, 20, 50_000, 2.0
    zt = _logits(n_tok, vocab, 4)
    s = _logits(n_tok, vocab, 6).requires_grad_(True)
    target = sample_targets(zt, n, temp, "bf16", generator=torch.Generator().manual_seed(9))
    (grad,) = torch.autograd.grad(distill_loss(s, target, "kl", temp), s)
    p = torch.softmax(zt.double() / temp, -1)
    q = torch.softmax(s.detach().double() / temp, -1)
    expected = temp * (q - p) / n_tok
    se = temp / n_tok * (p * (1 - p) / n).sqrt()
    assert torch.all((grad.double() - expected).abs() < 4.5 * se + 1e-7)
