"""Tests for codistill_ds.exchange.losses against references computed another way, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from codistill_ds.exchange.losses import (
    LOSSES,
    _teacher_log_probs,
    distill_loss,
    ignore_mask,
    peer_distill_loss,
    top1_agreement,
)
from codistill_ds.exchange.wire import CompressedLogits, compress

N, V, K = 6, 64, 8
DIVERGENCES = ("kl", "reverse_kl", "jsd")
U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits, round to nearest)


def _logits(n: int = N, v: int = V, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def _buckets(z: torch.Tensor, idx: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """float64 distribution over V (idx None) or over the k ids plus the summed remainder."""
    probs = torch.softmax(z.double() / temperature, dim=-1)
    if idx is None:
        return probs
    idx = idx.long()
    rest = probs.scatter(-1, idx, 0.0).sum(-1, keepdim=True)
    return torch.cat([probs.gather(-1, idx), rest], dim=-1)


def _reference(p: torch.Tensor, q: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row divergence via torch.distributions, float64."""
    cp, cq = Categorical(probs=p), Categorical(probs=q)
    if loss == "kl":
        return kl_divergence(cp, cq)
    if loss == "reverse_kl":
        return kl_divergence(cq, cp)
    cm = Categorical(probs=0.5 * (p + q))
    return 0.5 * kl_divergence(cp, cm) + 0.5 * kl_divergence(cq, cm)


def _row_losses(s: torch.Tensor, target: CompressedLogits, loss: str, t: float) -> torch.Tensor:
    """Per-token losses, each obtained through the public API with a one-hot mask."""
    rows = []
    for i in range(s.shape[0]):
        mask = torch.zeros(s.shape[0], dtype=torch.bool)
        mask[i] = True
        rows.append(distill_loss(s, target, loss, t, mask=mask).double())
    return torch.stack(rows)


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("topk", [0, K])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_divergence_matches_float64_reference(loss: str, topk: int, temperature: float) -> None:
    """loss == T^2 * mean_token D(p_T || q_T); T != 1 exercises the Hinton T^2 factor."""
    zt, s = _logits(seed=1), _logits(seed=2)
    target = compress(zt, topk, torch.float32, "logprobs", temperature)
    p = _buckets(zt, target.indices, temperature)
    q = _buckets(s, target.indices, temperature)
    expected = temperature ** 2 * _reference(p, q, loss).mean()
    got = distill_loss(s, target, loss, temperature)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_gradient_full_vocab_is_analytic(temperature: float) -> None:
    """d/ds of T^2 * mean KL(p || softmax(s/T)) is T * (q - p) / N per token."""
    zt, s = _logits(seed=3), _logits(seed=4).requires_grad_(True)
    target = compress(zt, 0, torch.float32, "logprobs", temperature)
    (grad,) = torch.autograd.grad(distill_loss(s, target, "kl", temperature), s)
    p = torch.softmax(zt.double() / temperature, -1)
    q = torch.softmax(s.detach().double() / temperature, -1)
    torch.testing.assert_close(grad.double(), temperature * (q - p) / N, rtol=0, atol=1e-5)


def test_forward_kl_gradient_topk_spreads_tail_mass() -> None:
    """Bucketed KL gradient: T(q_j - p_j)/N on sent ids, T(q_j - p_tail q_j / q_tail)/N elsewhere.

    This pins the logsumexp tail: a wrong tail would give the unsent ids the wrong share."""
    t = 1.5
    zt, s = _logits(seed=5), _logits(seed=6).requires_grad_(True)
    target = compress(zt, K, torch.float32, "logprobs", t)
    assert target.indices is not None
    (grad,) = torch.autograd.grad(distill_loss(s, target, "kl", t), s)
    idx = target.indices.long()
    p = torch.softmax(zt.double() / t, -1)
    q = torch.softmax(s.detach().double() / t, -1)
    sent = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
    p_tail = p.masked_fill(sent, 0).sum(-1, keepdim=True)
    q_tail = q.masked_fill(sent, 0).sum(-1, keepdim=True)
    w = torch.where(sent, p, p_tail * q / q_tail)
    torch.testing.assert_close(grad.double(), t * (q - w) / N, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("topk", [0, K])
def test_no_gradient_reaches_target(loss: str, topk: int) -> None:
    t = 2.0
    zt = _logits(seed=7).requires_grad_(True)
    s = _logits(seed=8).requires_grad_(True)
    kind = "logits" if loss == "mse" else "logprobs"
    source = zt if kind == "logits" else torch.log_softmax(zt / t, -1)
    if topk:
        idx = torch.topk(zt.detach(), topk, -1).indices
        target = CompressedLogits(source.gather(-1, idx), idx.to(torch.int32), kind)
    else:
        target = CompressedLogits(source, None, kind)
    assert target.values.requires_grad
    out = distill_loss(s, target, loss, t)
    assert torch.autograd.grad(out, zt, allow_unused=True) == (None,)
    distill_loss(s, target, loss, t).backward()
    assert zt.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("topk", [0, K])
def test_mask_equals_loss_on_kept_rows(loss: str, topk: int) -> None:
    kind = "logits" if loss == "mse" else "logprobs"
    zt, s = _logits(seed=9), _logits(seed=10)
    mask = torch.tensor([True, False, True, True, False, True])
    full = distill_loss(s, compress(zt, topk, torch.float32, kind, 1.3), loss, 1.3, mask=mask)
    kept = distill_loss(s[mask], compress(zt[mask], topk, torch.float32, kind, 1.3), loss, 1.3)
    torch.testing.assert_close(full, kept, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_fully_masked_is_zero_and_backward_works(loss: str) -> None:
    kind = "logits" if loss == "mse" else "logprobs"
    s = _logits(seed=11).requires_grad_(True)
    target = compress(_logits(seed=12), K, torch.bfloat16, kind, 1.0)
    out = distill_loss(s, target, loss, 1.0, mask=torch.zeros(N, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert s.grad is not None and torch.count_nonzero(s.grad) == 0


def test_ignore_mask() -> None:
    labels = torch.tensor([[5, -100, 0], [-100, 7, 2]])
    assert torch.equal(ignore_mask(labels), labels != -100)
    assert torch.equal(ignore_mask(labels, ignore_index=0), labels != 0)


@pytest.mark.parametrize("loss", LOSSES)
def test_peer_loss_is_mean_of_per_peer_losses(loss: str) -> None:
    kind = "logits" if loss == "mse" else "logprobs"
    s = _logits(seed=13)
    mask = torch.tensor([True, True, False, True, True, True])
    peers = [compress(_logits(seed=20 + j), topk, torch.float32, kind, 2.0)
             for j, topk in enumerate([K, 0, 3])]
    each = [distill_loss(s, peer, loss, 2.0, mask=mask) for peer in peers]
    got = peer_distill_loss(s, peers, loss, 2.0, mask=mask)
    torch.testing.assert_close(got, sum(each) / 3, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="at least one"):
        peer_distill_loss(s, [], loss, 2.0)


def test_topk_chain_rule_and_data_processing_bound() -> None:
    """KL_full - KL_bucketed == P_tail * KL(p_tail/P_tail || q_tail/Q_tail) >= 0, per token.

    This is the exact error top-k compression introduces into forward KL: merging the unsent
    ids into one bucket hides only the divergence within the tail, weighted by its mass."""
    t = 1.5
    zt, s = _logits(seed=30, scale=1.5), _logits(seed=31, scale=1.5)
    topk_target = compress(zt, K, torch.float32, "logprobs", t)
    full_target = compress(zt, 0, torch.float32, "logprobs", t)
    assert topk_target.indices is not None
    bucketed = _row_losses(s, topk_target, "kl", t) / t ** 2
    full = _row_losses(s, full_target, "kl", t) / t ** 2

    p = torch.softmax(zt.double() / t, -1)
    q = torch.softmax(s.double() / t, -1)
    unsent = torch.ones_like(p, dtype=torch.bool).scatter(-1, topk_target.indices.long(), False)
    p_tail_mass = p.masked_fill(~unsent, 0).sum(-1)
    p_tail = p.masked_fill(~unsent, 0) / p_tail_mass[:, None]
    q_tail = q.masked_fill(~unsent, 0) / q.masked_fill(~unsent, 0).sum(-1, keepdim=True)
    within_tail = torch.where(unsent, p_tail * (p_tail.log() - q_tail.log()), 0.0).sum(-1)
    assert torch.all(p_tail_mass > 0.05)  # the identity is not trivially 0 == 0
    torch.testing.assert_close(full - bucketed, p_tail_mass * within_tail, rtol=1e-4, atol=1e-5)
    assert torch.all(bucketed <= full + 1e-6)


def _kl_perturbation_bound(p: torch.Tensor, q: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Per-row bound on |KL(p'||q) - KL(p||q)| when |log p'_b - log p_b| <= eta_b for every b.

    KL(p'||q) - KL(p||q) = sum_b (p'_b - p_b) log(p_b/q_b) + KL(p'||p). With p'_b = p_b e^{e_b}
    and |e^{e_b} - 1| <= e^eta_b - 1, the first term is at most sum_b p_b (e^eta_b - 1)
    |log(p_b/q_b)|; the second is in [0, chi^2(p'||p)] = [0, sum_b p_b (e^{e_b} - 1)^2]."""
    growth = torch.expm1(eta)
    return (p * (growth * (p.log() - q.log()).abs() + growth ** 2)).sum(-1)


def _log_ratio_bound(weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Bound on |log(sum w e^u) - log(sum w)| given |u| <= delta elementwise."""
    total = weights.sum(-1)
    up = torch.log((weights * delta.exp()).sum(-1) / total)
    down = -torch.log((weights * (-delta).exp()).sum(-1) / total)
    return torch.maximum(up, down)


@pytest.mark.parametrize("topk", [0, K])
def test_bf16_wire_error_within_derived_bound(topk: int) -> None:
    """bf16 targets move the KL by at most T^2 * mean_token B, B from `_kl_perturbation_bound`.

    Derivation. bf16 keeps 8 significant bits, so each sent log-probability v is received as
    v' = v + u with |u| <= delta = 2^-8 |v|. The loss renormalizes the teacher:
    - full vocab: log p'_i - log p_i = u_i - c, with c = log sum_j p_j e^{u_j}; |c| <= gamma =
      max(log sum p e^delta, -log sum p e^-delta), so eta_i = delta_i + gamma.
    - top-k: sent ids get u_i - (log Z' - log Z), Z = max(S, 1), S = sum_i e^{v_i}; since max(., 0)
      is 1-Lipschitz, |log Z' - log Z| <= |log S' - log S| <= gamma (same formula, weights e^v).
      The tail 1 - S moves by at most eps = sum_i e^{v_i} (e^{delta_i} - 1), so its log moves by
      at most -log(1 - eps / (1 - S)) + gamma.
    Plus 1e-5 for float32 arithmetic in the two loss evaluations. The bound is worst-case
    (rounding errors all aligned with log(p/q)); on these inputs it is ~4% of the loss while
    the observed change is 1e-5 (full) to 4e-4 (top-k).
    """
    t = 1.5
    zt, s = _logits(seed=40, scale=1.5), _logits(seed=41, scale=1.5)
    exact = compress(zt, topk, torch.float32, "logprobs", t)
    rounded = compress(zt, topk, torch.bfloat16, "logprobs", t)
    v = exact.values.double()
    delta = U_BF16 * v.abs()
    assert torch.all((rounded.values.double() - v).abs() <= delta)
    if topk == 0:
        p = torch.softmax(v, -1)
        eta = delta + _log_ratio_bound(p, delta)[:, None]
        q = torch.softmax(s.double() / t, -1)
    else:
        assert exact.indices is not None and rounded.indices is not None
        assert torch.equal(exact.indices, rounded.indices)
        weights, total = v.exp(), v.exp().sum(-1)
        gamma = _log_ratio_bound(weights, delta)
        eps = (weights * torch.expm1(delta)).sum(-1)
        assert torch.all(eps < 1 - total)
        eta_tail = -torch.log1p(-eps / (1 - total)) + gamma
        eta = torch.cat([delta + gamma[:, None], eta_tail[:, None]], dim=-1)
        p = torch.cat([weights, (1 - total)[:, None]], dim=-1)
        q = _buckets(s, exact.indices, t)
    bound = t ** 2 * _kl_perturbation_bound(p, q, eta).mean() + 1e-5
    diff = (distill_loss(s, rounded, "kl", t) - distill_loss(s, exact, "kl", t)).abs().item()
    assert 0 < diff <= bound.item()
    assert bound.item() < 0.05 * distill_loss(s, exact, "kl", t).item()  # bound is informative


def test_zero_teacher_tail_stays_finite() -> None:
    """bf16 rounding can make the sent probabilities sum past 1; the tail is then clamped to 0.

    Forward KL must ignore the empty bucket (0 log 0 = 0) and no loss may produce NaN."""
    values = torch.tensor([[math.log(0.6), math.log(0.5)]], dtype=torch.bfloat16)
    target = CompressedLogits(values, torch.tensor([[2, 0]], dtype=torch.int32), "logprobs")
    s = torch.tensor([[0.3, -1.0, 2.0, 0.5, -0.2]], requires_grad=True)
    for loss in DIVERGENCES:
        out = distill_loss(s, target, loss, 1.0)
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(grad).all()
    p_sent = values.double().exp()
    p = torch.cat([p_sent / p_sent.sum(), torch.zeros(1, 1, dtype=torch.float64)], dim=-1)
    q = _buckets(s.detach(), target.indices, 1.0)
    expected = (p[:, :2] * (p[:, :2].log() - q[:, :2].log())).sum()
    torch.testing.assert_close(distill_loss(s, target, "kl", 1.0).double(), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topk", [0, 5])
def test_mse_matches_hand_formula(topk: int) -> None:
    zt, s = _logits(n=4, v=12, seed=50), _logits(n=4, v=12, seed=51)
    target = compress(zt, topk, torch.float32, "logits", temperature=3.0)
    mask = torch.tensor([True, True, False, True])
    per_row = []
    for i in range(4):
        ids = range(12) if target.indices is None else target.indices[i].tolist()
        sq = [(float(s[i, j]) - float(zt[i, j])) ** 2 for j in ids]
        per_row.append(sum(sq) / len(sq))
    kept = [r for r, m in zip(per_row, mask.tolist()) if m]
    got = distill_loss(s, target, "mse", temperature=3.0, mask=mask)  # T must not matter
    assert got.item() == pytest.approx(sum(kept) / len(kept), rel=1e-6)
    assert distill_loss(s, target, "mse", 1.0).item() == pytest.approx(sum(per_row) / 4, rel=1e-6)


def test_low_precision_student_is_computed_in_float32() -> None:
    zt, s = _logits(seed=60), _logits(seed=61).to(torch.bfloat16)
    target = compress(zt, K, torch.bfloat16, "logprobs", 2.0)
    got = distill_loss(s, target, "jsd", 2.0)
    assert got.dtype == torch.float32
    assert torch.equal(got, distill_loss(s.float(), target, "jsd", 2.0))


def test_top1_agreement_counts() -> None:
    s = torch.tensor([[0.0, 5, 1], [2, 0, 0], [0, 0, 3], [1, 2, 0]])  # argmax 1, 0, 2, 1
    idx = torch.tensor([[1, 0], [2, 0], [2, 1], [0, 1]], dtype=torch.int32)
    target = CompressedLogits(torch.tensor([[-0.1, -3.0]] * 4), idx, "logprobs")
    assert top1_agreement(s, target) == (2, 4)
    mask = torch.tensor([True, True, False, True])
    assert top1_agreement(s, target, mask) == (1, 3)
    full = CompressedLogits(torch.tensor([[0.0, 9, 1], [3, 1, 0], [0, 4, 1], [0, 8, 1]]), None,
                            "logits")
    assert top1_agreement(s, full) == (3, 4)
    assert top1_agreement(s, full, torch.zeros(4, dtype=torch.bool)) == (0, 0)


def test_errors() -> None:
    s = _logits()
    logprobs = compress(_logits(seed=70), K, torch.float32, "logprobs", 1.0)
    logits = compress(_logits(seed=70), K, torch.float32, "logits", 1.0)
    with pytest.raises(ValueError, match="kl, reverse_kl, jsd, mse"):
        distill_loss(s, logprobs, "cross_entropy", 1.0)
    for loss in DIVERGENCES:
        with pytest.raises(ValueError, match="logprobs"):
            distill_loss(s, logits, loss, 1.0)
    with pytest.raises(ValueError, match="logits"):
        distill_loss(s, logprobs, "mse", 1.0)
    with pytest.raises(ValueError, match="mask"):
        distill_loss(s, logprobs, "kl", 1.0, mask=torch.ones(N))
    with pytest.raises(ValueError, match="tokens"):
        distill_loss(s[:3], logprobs, "kl", 1.0)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, logprobs, "kl", 0.0)


def _sent_buckets(target: CompressedLogits) -> torch.Tensor:
    """float64 teacher buckets from the values as received: exp(v) per sent id, then the rest
    1 - sum exp(v), renormalized when wire rounding pushed the sum past 1."""
    sent = target.values.double().exp()
    tail = (1 - sent.sum(-1, keepdim=True)).clamp_min(0)
    p = torch.cat([sent, tail], dim=-1)
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("loss", DIVERGENCES)
@pytest.mark.parametrize("topk", [1, 2, K])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_fp8_and_top1_targets_match_float64_reference(loss: str, topk: int,
                                                      dtype: torch.dtype) -> None:
    """Down to top-1 and fp8 values, the loss is the exact divergence over k+1 buckets of what
    was received (the wire's rounding is the only approximation, and it is in the values)."""
    t = 1.3
    zt, s = _logits(seed=80, scale=3.0), _logits(seed=81, scale=3.0)
    target = compress(zt, topk, dtype, "logprobs", t)
    assert target.k == topk and target.wire_format().value_dtype == (
        "fp8" if dtype == torch.float8_e4m3fn else "bf16")
    p = _sent_buckets(target)
    q = _buckets(s, target.indices, t)
    expected = t ** 2 * _reference(p, q, loss).mean()
    torch.testing.assert_close(distill_loss(s, target, loss, t).double(), expected,
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_top1_tail_bucket_mass_is_exact(dtype: torch.dtype) -> None:
    """The tail bucket holds 1 - p_1 of the received p_1 to float32 precision, even when p_1 is
    within 1e-5 of 1 (where float32 1 - exp(v) is off by ~1%: expm1 keeps it exact), and the
    gradient is the two-bucket one: T (q_1 - p_1) / N on the top-1 logit, the exact tail mass
    spread over the rest in proportion to the student's tail."""
    t = 1.0
    zt = torch.zeros(N, V)
    zt[:, 0] = torch.linspace(2.0, 16.0, N)  # p_1 from 0.08 to 1 - 7e-6
    s = _logits(seed=82).requires_grad_(True)
    target = compress(zt, 1, dtype, "logprobs", t)
    p1 = target.values.double().exp().squeeze(-1)
    tail_ref = -torch.expm1(target.values.double()).squeeze(-1)  # float64: 1 - p_1
    assert torch.all(tail_ref > 0) and tail_ref.min() < 1e-5
    tail = _teacher_log_probs(target)[:, -1].double().exp()
    torch.testing.assert_close(tail, tail_ref, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(distill_loss(s, target, "kl", t), s)
    q = torch.softmax(s.detach().double() / t, -1)
    torch.testing.assert_close(grad[:, 0].double(), t * (q[:, 0] - p1) / N, rtol=0, atol=1e-7)
    # The rest of the gradient spreads the exact tail mass in proportion to the student's tail.
    q_tail = 1 - q[:, 0]
    torch.testing.assert_close(grad[:, 1:].double(),
                               t * (q[:, 1:] - tail_ref[:, None] * q[:, 1:] / q_tail[:, None]) / N,
                               rtol=0, atol=1e-7)


def test_peer_weights_give_the_weighted_mean_of_each_peers_divergence():
    """peer_distill_loss(..., weights) == sum_j w_j D_j / sum_j w_j with D_j computed peer by peer."""
    torch.manual_seed(3)
    student = torch.randn(12, 50, requires_grad=True)
    peers = [compress(torch.randn(12, 50), 8, torch.bfloat16, "logprobs", 1.0) for _ in range(3)]
    weights = [0.25, 1.0, 0.0]
    got = peer_distill_loss(student, peers, "kl", 1.0, weights=weights)
    each = [peer_distill_loss(student, [p], "kl", 1.0) for p in peers]
    want = sum(w * d for w, d in zip(weights, each)) / sum(weights)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="not all 0"):
        peer_distill_loss(student, peers, "kl", 1.0, weights=[0.0, 0.0, 0.0])


def _reference_loss(s64: torch.Tensor, zt: torch.Tensor, target: CompressedLogits, loss: str,
                    t: float, mask: torch.Tensor) -> torch.Tensor:
    """The same loss built another way, in float64 from the raw logits: torch.distributions over
    the k+1 buckets (or V), or the squared difference at the sent ids for mse; masked mean."""
    if loss == "mse":
        ids = torch.arange(s64.shape[1]).expand_as(s64) if target.indices is None else target.indices.long()
        per_row = (s64.gather(-1, ids) - zt.double().gather(-1, ids)).pow(2).mean(-1)
    else:
        p = _buckets(zt, target.indices, t)
        q = _buckets(s64, target.indices, t)  # differentiable: the student's side carries the graph
        per_row = t ** 2 * _reference(p, q, loss)
    return per_row[mask].sum() / mask.sum()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("topk", [0, K])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_every_loss_gradient_matches_float64_autograd_reference(loss: str, topk: int, temperature: float) -> None:
    """Issue 24, item 8: reverse_kl, jsd and mse (and kl) were checked for their values and for a
    finite gradient only. Here the student gradient of each, top-k or full vocabulary, with a
    mask and T != 1, equals autograd through the float64 reference (torch.distributions on the
    bucketed softmax; mse by hand). A loss whose value is right but whose graph is cut or
    weighted wrong (a detach on the student's own mass in reverse_kl/jsd) fails here only."""
    zt, s = _logits(seed=90), _logits(seed=91).requires_grad_(True)
    kind = "logits" if loss == "mse" else "logprobs"
    target = compress(zt, topk, torch.float32, kind, temperature)
    mask = torch.tensor([True, False, True, True, False, True])
    (grad,) = torch.autograd.grad(distill_loss(s, target, loss, temperature, mask=mask), s)
    s64 = s.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(_reference_loss(s64, zt, target, loss, temperature, mask), s64)
    assert want.abs().max() > 1e-3  # the reference is not trivially zero
    assert torch.count_nonzero(grad[~mask]) == 0  # masked rows get nothing
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_weighted_peer_gradient_is_the_weighted_mean_of_each_peers_gradient(loss: str) -> None:
    """The gradient of the weighted mean over three peers (one at weight 0) equals the weighted
    mean of the float64 reference gradients of each peer, computed one at a time."""
    kind = "logits" if loss == "mse" else "logprobs"
    zs = [_logits(seed=s) for s in (92, 93, 94)]
    peers = [compress(z, K, torch.float32, kind, 1.0) for z in zs]
    weights = [0.5, 0.0, 2.0]
    s = _logits(seed=95).requires_grad_(True)
    (grad,) = torch.autograd.grad(peer_distill_loss(s, peers, loss, 1.0, weights=weights), s)
    mask = torch.ones(N, dtype=torch.bool)
    want = torch.zeros(N, V, dtype=torch.float64)
    for w, z, p in zip(weights, zs, peers):
        s64 = s.detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(_reference_loss(s64, z, p, loss, 1.0, mask), s64)
        want += w * g / sum(weights)
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=2e-6)
