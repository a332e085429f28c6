"""The student side on vocabulary slices: the k+1 bucket log-probabilities at the teacher's ids,
every divergence, cross-entropy and agreement, without gathering the vocabulary (package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from codistill_ds.exchange.losses import (
    _check_kind,
    _check_target,
    _divergence_terms,
    _masked_mean,
    _mse_at,
    _sampled_kl_at,
    _teacher_log_probs,
)
from codistill_ds.exchange.vocab.slice import (
    VocabSlice,
    _at_ids,
    _into_partial_sums,
    _logsumexp,
    _owned,
    _sum_over_tp,
    _vocab_columns,
)
from codistill_ds.exchange.wire import (
    CompressedLogits,
)

# --------------------------------------------------------------------------- student side

class _Student:
    """The student's slice at temperature T with its whole-vocabulary log-sum-exp, shared by
    every peer's loss (the all-reduces happen once)."""

    def __init__(self, vs: VocabSlice, temperature: float) -> None:
        self.vs = vs
        self.zt = vs.local.float() / temperature
        self.m, self.lse = _logsumexp(self.zt, vs.comm)

    def log_q_at(self, ids: torch.Tensor) -> torch.Tensor:
        """log q at global ids [N, m] (repeats allowed)."""
        return _at_ids(self.zt, self.vs, ids) - self.lse

    def log_q_slice(self) -> torch.Tensor:
        """log q over my slice, to be reduced into per-rank partial sums (see
        `_IntoPartialSums`: the log-sum-exp's gradient is summed over tp)."""
        return self.zt - _into_partial_sums(self.lse, self.vs.comm)

    def buckets(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, k+1]: log q at the k distinct ids, then the log of the rest's mass (a sum of
        exp(z - max) over the entries not sent, never 1 - sum: exact for a 1e-12 tail)."""
        vs = self.vs
        loc, owned = _owned(vs, ids)
        sent = torch.zeros(vs.num_tokens(), vs.width + 1, dtype=torch.bool, device=loc.device)
        sent.scatter_(-1, torch.where(owned, loc, torch.full_like(loc, vs.width)), True)
        rest = self.zt.masked_fill(sent[:, :vs.width], float("-inf"))
        got = self.zt.gather(-1, loc)
        # One all-reduce for both sums: z / T at the ids (owner-masked) and the rest's mass.
        both = _sum_over_tp(torch.cat([torch.where(owned, got, torch.zeros_like(got)),
                                       torch.exp(rest - self.m).sum(dim=-1, keepdim=True)], -1), vs.comm)
        z_ids, tail = both[:, :-1], both[:, -1:]
        return torch.cat([z_ids - self.lse, torch.log(tail) + self.m - self.lse], dim=-1)


def _teacher_slice_log_probs(target: CompressedLogits, vs: VocabSlice) -> torch.Tensor:
    """My columns of log_softmax(values) for a full-vocabulary target (constants)."""
    with torch.no_grad():
        v = _vocab_columns(target.values, vs).detach().float()
        return v - _logsumexp(v, vs.comm)[1]


def _per_token(vs: VocabSlice, st: _Student | None, target: CompressedLogits, loss: str,
               temperature: float) -> torch.Tensor:
    """Per-token loss [N], the same number on every TP rank (`losses._per_token_loss`)."""
    comm = vs.comm
    if loss == "mse":
        s = vs.local.float()
        if target.indices is None:
            z = _vocab_columns(target.values, vs).detach().float()
            return _sum_over_tp((s - z).pow(2).sum(dim=-1), comm) / vs.vocab
        return _mse_at(_at_ids(s, vs, target.indices), target)
    assert st is not None
    if target.kind == "samples":
        return _sampled_kl_at(st.log_q_at(target.indices), target, temperature)
    if target.indices is None:
        terms = _divergence_terms(_teacher_slice_log_probs(target, vs), st.log_q_slice(), loss)
        return _sum_over_tp(terms, comm) * (temperature * temperature)
    terms = _divergence_terms(_teacher_log_probs(target), st.buckets(target.indices), loss)
    return terms * (temperature * temperature)


def _check_student(vs: Any, what: str) -> None:
    if not isinstance(vs, VocabSlice):
        raise TypeError(f"vocab_parallel.{what} takes a VocabSlice, got {type(vs).__name__}; "
                        "whole-vocabulary logits go to codistill_ds.losses")


def distill_loss(vs: VocabSlice, target: CompressedLogits, loss: str, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """`losses.distill_loss` of the whole logits, from my slice: the same scalar on every TP
    rank; its gradient reaches `vs.local` as the slice of the whole-vocabulary gradient."""
    return peer_distill_loss(vs, [target], loss, temperature, mask)


def peer_distill_loss(vs: VocabSlice, targets: Sequence[CompressedLogits], loss: str,
                      temperature: float, mask: torch.Tensor | None = None,
                      weights: Sequence[float] | None = None) -> torch.Tensor:
    """`losses.peer_distill_loss` from my slice (one log-sum-exp shared by the peers)."""
    _check_student(vs, "peer_distill_loss")
    if not targets:
        raise ValueError("peer_distill_loss needs at least one peer target")
    if weights is not None and (len(weights) != len(targets) or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"need one weight >= 0 per target, not all 0; got {weights} for {len(targets)} targets")
    for target in targets:
        _check_kind(loss, target)
        _check_target(vs.num_tokens(), vs.vocab, target, temperature, mask)
    st = None if loss == "mse" else _Student(vs, temperature)
    terms = [_masked_mean(_per_token(vs, st, target, loss, temperature), mask) for target in targets]
    if weights is None:
        return torch.stack(terms).sum() / len(terms)
    w = torch.tensor(list(weights), dtype=torch.float32, device=vs.local.device)
    return (torch.stack(terms) * w).sum() / w.sum()


def cross_entropy(vs: VocabSlice, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy(whole_logits.float(), labels, ignore_index=..., reduction=...)` from my
    slice: lse - z[label], the label's logit an owner-masked gather. "mean" divides by the
    labels that count (NaN when none does, as torch); "none" gives 0 at ignored positions."""
    _check_student(vs, "cross_entropy")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    labels = labels.to(vs.local.device).long()
    if labels.shape != (vs.num_tokens(),):
        raise ValueError(f"labels must be ({vs.num_tokens()},), got {tuple(labels.shape)}")
    valid = labels != ignore_index
    if not bool(((labels >= 0) & (labels < vs.vocab) | ~valid).all()):
        raise ValueError(f"labels outside [0, {vs.vocab}) that are not ignore_index={ignore_index}")
    st = _Student(vs, 1.0)
    picked = st.log_q_at(torch.where(valid, labels, torch.zeros_like(labels))[:, None])[:, 0]
    per_token = torch.where(valid, -picked, torch.zeros_like(picked))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().to(per_token.dtype)


def argmax(vs: VocabSlice) -> torch.Tensor:
    """Global argmax [N] int64 of the whole logits: ties (and NaN, the largest as in torch) go
    to the lowest global id, like torch.argmax. A local argmax, then one all-gather."""
    _check_student(vs, "argmax")
    with torch.no_grad():
        z = vs.local.detach()
        li = z.argmax(dim=-1)
        mine = torch.stack([z.gather(-1, li[:, None])[:, 0].double(), (li + vs.offset).double()], -1)
        if vs.comm.size == 1:
            return mine[:, 1].long()
        both = torch.stack(vs.comm.all_gather(mine))  # [T, N, 2]
        vals, ids = both[..., 0], both[..., 1]
        nan = torch.isnan(vals)
        best = torch.where(nan.any(dim=0), nan, vals == vals.max(dim=0).values)
        return torch.where(best, ids, torch.full_like(ids, float("inf"))).min(dim=0).values.long()


def top1_agreement(vs: VocabSlice, target: CompressedLogits,
                   mask: torch.Tensor | None = None) -> tuple[int, int]:
    """`losses.top1_agreement` from my slice: (agreeing, counted), the same on every TP rank (so
    count them over one rank per TP group when summing over a group)."""
    _check_student(vs, "top1_agreement")
    if target.num_tokens() != vs.num_tokens():
        raise ValueError(f"student has {vs.num_tokens()} tokens, target {target.num_tokens()}")
    if target.fmt is not None and target.fmt.vocab not in (None, vs.vocab):
        raise ValueError(f"the target indexes a vocabulary of {target.fmt.vocab}, the student {vs.vocab}")
    with torch.no_grad():
        agree = argmax(vs) == target.top1().to(vs.local.device)
        if mask is not None:
            agree = agree & mask.to(agree.device)
            counted = int(mask.sum().item())
        else:
            counted = int(agree.numel())
        return int(agree.sum().item()), counted
