"""Distillation losses between a replica and its peers' compressed predictions.

Codistillation (Anil et al. 2018, arXiv 1804.03235) adds to each replica's cross-entropy
alpha(t) * 1/(K-1) * sum_{j != i} D(f_j || f_i), where the peers' predictions f_j are constants:
no gradient flows into them, which is what lets replicas train on separate hardware and only
swap predictions.

The divergences are taken at temperature T and multiplied by T^2 (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network"): the softened gradient scales as 1/T^2, so the
factor keeps the distillation weight alpha meaningful when T changes.

Top-k payloads are compared over k+1 buckets (the k sent ids plus one tail bucket for the rest
of the mass). Merging outcomes can only lower a KL (data-processing inequality), and the chain
rule makes the gap exactly P_tail * KL(p_tail || q_tail) -- the stated bound on what top-k
compression hides. The student's tail mass is a logsumexp over its non-top-k entries, never
log(1 - sum), which would cancel catastrophically when the top-k hold nearly all the mass.

Sampled targets (kind "samples", `sampling.py`) carry ids drawn from the teacher instead of its
top-k; their forward-KL estimate is unbiased (Anshumann et al., ACL 2025, "Sparse Logit
Sampling"), where top-k buckets are biased low by the within-tail divergence.

Everything is computed in float32 whatever the input dtype, because bf16 log-probabilities
cannot resolve the small differences a KL sums.
"""

from __future__ import annotations

import math

import torch

from codistill_ds.exchange.wire import CompressedLogits, check_whole_vocabulary

LOSSES = ("kl", "reverse_kl", "jsd", "mse")

# Probabilities are floored at the smallest normal float32 before taking logs: a zero teacher
# bucket (e.g. a tail clamped to 0 after bf16 rounding) would otherwise make reverse KL infinite.
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def ignore_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Positions that count, using the same convention as cross-entropy's ignore_index.

    Padding and prompt tokens labelled ignore_index carry no training signal for CE, so the
    distillation term skips them too; otherwise padding would dilute the per-token mean."""
    return labels != ignore_index


def _check_inputs(student_logits: torch.Tensor, target: CompressedLogits,
                  temperature: float, mask: torch.Tensor | None) -> None:
    check_whole_vocabulary(student_logits, "this loss")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    _check_target(*student_logits.shape, target, temperature, mask)


def _check_target(n: int, vocab: int, target: CompressedLogits, temperature: float,
                  mask: torch.Tensor | None) -> None:
    """The target against a student of n tokens over `vocab` entries (shared with
    `vocab_parallel`, whose students hold a slice of a `vocab`-entry vocabulary).

    The vocabulary check is what catches a tensor-parallel slice [N, V/T] handed in as if it
    were the whole vocabulary: with k < V/T no shape check can, but the target's format knows
    the V its ids index."""
    if target.fmt is not None and target.fmt.vocab is not None and target.fmt.vocab != vocab:
        raise ValueError(f"the target indexes a vocabulary of {target.fmt.vocab} but the student "
                         f"has {vocab} entries; a tensor-parallel vocabulary slice needs "
                         "codistill_ds.vocab_parallel")
    if target.num_tokens() != n:
        raise ValueError(f"target covers {target.num_tokens()} tokens, student has {n}")
    if target.indices is None and target.k != vocab:
        raise ValueError(f"full-vocabulary target has {target.k} entries, student vocab is {vocab}")
    if target.indices is not None and target.k >= vocab and target.kind != "samples":
        raise ValueError(f"top-k target with k={target.k} >= vocab {vocab}; send it as full vocab")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (n,)):
        raise ValueError(f"mask must be a bool tensor of shape ({n},), "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def _check_kind(loss: str, target: CompressedLogits) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(LOSSES)}")
    if target.kind == "samples":
        if loss != "kl":
            raise ValueError(f"sampled targets estimate forward KL only, not {loss!r}")
        return
    needed = "logits" if loss == "mse" else "logprobs"
    if target.kind != needed:
        raise ValueError(f"loss {loss!r} needs targets of kind {needed!r}, got {target.kind!r}; "
                         f"set the exchange payload kind to match the loss")


def _teacher_log_probs(target: CompressedLogits) -> torch.Tensor:
    """Teacher log-probabilities over V (full) or k+1 buckets (top-k), renormalized to sum 1.

    Wire rounding leaves the sent probabilities summing to slightly more or less than the truth;
    renormalizing keeps the divergence a divergence between distributions. For top-k, the tail
    is 1 - exp(logsumexp(values)) clamped at 0 and the normalizer Z = max(sum, 1), so
    log Z = max(logsumexp, 0); the sent entries keep their exact log values (v - log Z)."""
    v = target.values.detach().float()
    if target.indices is None:
        return torch.log_softmax(v, dim=-1)
    lse = torch.logsumexp(v, dim=-1, keepdim=True)
    log_z = lse.clamp_min(0.0)
    tail = (-torch.expm1(lse)).clamp_min(0.0)
    return torch.cat([v - log_z, torch.log(tail) - log_z], dim=-1)


def _student_bucket_log_probs(log_q: torch.Tensor, target: CompressedLogits) -> torch.Tensor:
    """Student log-probabilities over the same buckets as the teacher.

    The tail is a logsumexp over the non-top-k entries (top-k positions set to -inf), which is
    exact and stable even when the tail holds 1e-12 of the mass, where log(1 - sum) is not."""
    if target.indices is None:
        return log_q
    idx = target.indices.long()
    top = log_q.gather(-1, idx)
    rest = log_q.scatter(-1, idx, float("-inf"))
    return torch.cat([top, torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)


def _kl_terms(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Per-token sum of p * (log p - log r), with 0 * log 0 = 0 in value and in gradient.

    Masking the log difference (not the product) keeps -inf out of both passes, so a bucket with
    zero mass contributes exactly 0 and never a NaN gradient."""
    diff = torch.where(p > 0, log_p - log_r, torch.zeros_like(log_p))
    return (p * diff).sum(dim=-1)


def _divergence_per_token(log_q_student: torch.Tensor, target: CompressedLogits, loss: str,
                          temperature: float) -> torch.Tensor:
    """Per-token kl / reverse_kl / jsd, already multiplied by T^2 (Hinton et al. 2015)."""
    log_p = _teacher_log_probs(target)
    log_q = _student_bucket_log_probs(log_q_student, target)
    return _divergence_terms(log_p, log_q, loss) * (temperature * temperature)


def _divergence_terms(log_p: torch.Tensor, log_q: torch.Tensor, loss: str) -> torch.Tensor:
    """Sum over the last dimension of the kl / reverse_kl / jsd summands of teacher log_p and
    student log_q, not yet scaled by T^2. Every summand is elementwise, so a vocabulary slice's
    partial sum, summed over the slices, is the whole (`vocab_parallel`)."""
    p, q = log_p.exp(), log_q.exp()
    log_p_safe = log_p.clamp_min(_LOG_FLOOR)
    if loss == "kl":
        per_token = _kl_terms(p, log_p_safe, log_q)
    elif loss == "reverse_kl":
        per_token = _kl_terms(q, log_q, log_p_safe)
    else:  # jsd
        log_m = torch.log((0.5 * (p + q)).clamp_min(torch.finfo(torch.float32).tiny))
        per_token = 0.5 * _kl_terms(p, log_p_safe, log_m) + 0.5 * _kl_terms(q, log_q, log_m)
    return per_token


def _sampled_kl_per_token(log_q_student: torch.Tensor, target: CompressedLogits,
                          temperature: float) -> torch.Tensor:
    """T^2 * (1/n) sum_s [log p(x_s) - log q(x_s)] over n ids x_s drawn from the teacher p.

    E_{x~p}[log p(x) - log q(x)] = KL(p || q), so the estimate is unbiased, and so is its
    gradient -(1/n) sum_s grad log q(x_s): the teacher proposes and importance weights are 1.
    The sent log p(x_s) only shifts the value (a constant to the student); the gradient needs
    the ids alone."""
    return _sampled_kl_at(log_q_student.gather(-1, target.indices.long()), target, temperature)


def _sampled_kl_at(log_q: torch.Tensor, target: CompressedLogits, temperature: float) -> torch.Tensor:
    """`_sampled_kl_per_token` from the student's log q at the drawn ids, [N, n]."""
    return (target.values.detach().float() - log_q).mean(dim=-1) * (temperature * temperature)


def _mse_per_token(student: torch.Tensor, target: CompressedLogits) -> torch.Tensor:
    """Mean squared logit difference over the sent entries (Ba & Caruana style logit matching).

    Only the sent ids are compared: the peer said nothing about the others' logits."""
    s = student if target.indices is None else student.gather(-1, target.indices.long())
    return _mse_at(s, target)


def _mse_at(s: torch.Tensor, target: CompressedLogits) -> torch.Tensor:
    """`_mse_per_token` from the student's logits at the sent entries, [N, k]."""
    return (s - target.values.detach().float()).pow(2).mean(dim=-1)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over counted tokens; a graph-connected zero when none count.

    The zero keeps backward() and DDP/ZeRO gradient hooks uniform across ranks even on a batch
    that is all padding. Dividing by max(count, 1) instead of branching on the count avoids a
    device-to-host sync every step; torch.where (not a multiply by the mask) keeps an infinite
    loss in a dropped row from turning the sum into NaN."""
    if mask is None:
        return per_token.sum() / max(per_token.numel(), 1)
    kept = torch.where(mask, per_token, torch.zeros_like(per_token))
    return kept.sum() / mask.sum().clamp_min(1).to(per_token.dtype)


def _per_token_loss(student: torch.Tensor, log_q: torch.Tensor | None, target: CompressedLogits,
                    loss: str, temperature: float) -> torch.Tensor:
    if loss == "mse":
        return _mse_per_token(student, target)
    assert log_q is not None
    if target.kind == "samples":
        return _sampled_kl_per_token(log_q, target, temperature)
    return _divergence_per_token(log_q, target, loss, temperature)


def _student_log_q(student: torch.Tensor, loss: str, temperature: float) -> torch.Tensor | None:
    # One [N, V] log_softmax shared by every peer: it is the dominant cost of the loss.
    return None if loss == "mse" else torch.log_softmax(student / temperature, dim=-1)


def distill_loss(student_logits: torch.Tensor, target: CompressedLogits, loss: str,
                 temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar divergence of the student's predictions from one peer's, meaned over counted tokens.

    kl is forward KL(p_teacher || q_student) (mass-covering, the Hinton et al. choice);
    reverse_kl and jsd are mode-seeking / symmetric alternatives; mse matches raw logits and
    needs "logits" payloads. The gradient reaches only `student_logits`."""
    _check_kind(loss, target)
    _check_inputs(student_logits, target, temperature, mask)
    student = student_logits.float()
    log_q = _student_log_q(student, loss, temperature)
    per_token = _per_token_loss(student, log_q, target, loss, temperature)
    return _masked_mean(per_token, mask)


def peer_distill_loss(student_logits: torch.Tensor, targets: list[CompressedLogits], loss: str,
                      temperature: float, mask: torch.Tensor | None = None,
                      weights: list[float] | None = None) -> torch.Tensor:
    """The 1/(K-1) * sum over peers of `distill_loss`, sharing the student's log-softmax.

    Averaging (not summing) keeps alpha's meaning independent of the number of replicas K.
    `weights` (one per target, >= 0, not all 0) make it the weighted mean sum_j w_j D_j / sum_j w_j:
    a large model may learn less from a small peer than the small one from it."""
    if not targets:
        raise ValueError("peer_distill_loss needs at least one peer target")
    if weights is not None and (len(weights) != len(targets) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"need one weight >= 0 per target, not all 0; got {weights} for {len(targets)} targets")
    for target in targets:
        _check_kind(loss, target)
        _check_inputs(student_logits, target, temperature, mask)
    student = student_logits.float()
    log_q = _student_log_q(student, loss, temperature)
    terms = [_masked_mean(_per_token_loss(student, log_q, target, loss, temperature), mask)
             for target in targets]
    if weights is None:
        return torch.stack(terms).sum() / len(terms)
    w = torch.tensor(weights, dtype=torch.float32, device=student.device)
    return (torch.stack(terms) * w).sum() / w.sum()


def top1_agreement(student_logits: torch.Tensor, target: CompressedLogits,
                   mask: torch.Tensor | None = None) -> tuple[int, int]:
    """(agreeing, counted) tokens: raw counts so callers can all-reduce them across ranks.

    A ratio per rank could not be averaged correctly when ranks count different token numbers.
    Agreement between replicas is the diversity signal codistillation papers track."""
    check_whole_vocabulary(student_logits, "top1_agreement")
    if student_logits.dim() != 2 or student_logits.shape[0] != target.num_tokens():
        raise ValueError(f"student_logits {tuple(student_logits.shape)} does not match "
                         f"{target.num_tokens()} target tokens")
    if target.fmt is not None and target.fmt.vocab not in (None, student_logits.shape[1]):
        raise ValueError(f"the target indexes a vocabulary of {target.fmt.vocab} but the student "
                         f"has {student_logits.shape[1]} entries; a tensor-parallel vocabulary "
                         "slice needs codistill_ds.vocab_parallel")
    with torch.no_grad():
        agree = student_logits.argmax(dim=-1) == target.top1().to(student_logits.device)
        if mask is not None:
            agree = agree & mask
            counted = int(mask.sum().item())
        else:
            counted = int(agree.numel())
        return int(agree.sum().item()), counted
