"""Which peers a group distills on in a round: every received payload checked, bad peers skipped.

A peer's predictions reach the distillation loss only after two kinds of checks, each with its
reason counted in `skipped_reasons` (docs/design.md, "Trusting peers"):

- **integrity** (always on): the bytes may come from a bug, a wrong build or someone holding the
  shared secret, so a payload whose ids fall outside the vocabulary (an index error inside a
  loss), whose values are not a probability scale (log-probabilities above 0, more than all of
  the mass in the top-k) or not finite is dropped *before* any loss reads it: "malformed" or
  "nan". Byte length and authentication tags are the transport's (`transport/trust.py`),
  counted here as it reports them ("malformed", "auth").
- **peer guard** (`codistill.peer_guard_ratio`, 0 = off): finite, well-formed predictions can
  still be wrong (a diverged run, a wrong checkpoint, another dataset). A peer is skipped when
  the training loss it reports is more than ratio x mine ("loss"), or when its predictions
  explain the exchange batch's own next tokens far worse than mine do ("labels"). The second
  check trusts nothing the peer says about itself: the tokens are known to every group, and
  `label_nll` scores the payload as the distribution the loss would distill toward (the top-k
  entries, the tail mass spread evenly over the other ids), so a confident random peer scores
  about ln(V) or worse where a trained one scores its own cross-entropy.

Every figure is summed over my group's ranks (one all-reduce, as the NaN check always was), so
all ranks of my group skip the same peers and stay in lockstep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from codistill_ds.distributed import comm
from codistill_ds.exchange.wire import CompressedLogits

REASONS = ("malformed", "nan", "auth", "loss", "labels")
"""Why a peer's predictions were skipped, in the order they are tested."""

LSE_SLACK = 0.25
"""How far above log(1) the top-k log-probabilities' log-sum-exp may be: fp8's 2^-4 relative
rounding of each value can push the sum of k probabilities a little past 1 (the loss renormalizes
it); a payload claiming much more than all the mass is not a distribution."""
LOGIT_LIMIT = 1e4
"""Largest raw logit magnitude accepted (loss "mse"): a squared error on larger values would
swamp every gradient."""
TAIL_FLOOR = 1e-6
"""The least tail mass `label_nll` credits a label outside the top-k (log(1e-6) ~ -13.8)."""
LABEL_EMA = 0.8
"""Weight of the past in each peer's moving average of log(its label NLL / mine). One exchange
batch is a few dozen sequences: between two healthy tiny models the ratio of one round was seen
from 0.7 to 5 (measured, tests/dist/test_peer_trust.py), so the guard decides on the average
(a peer's first scored round starts it, so a bad peer is skipped from its first round)."""


def check_content(p: CompressedLogits, vocab: int | None) -> str | None:
    """"nan", "malformed" or None (usable) for one received payload, before any loss reads it.

    Checks what unpacking cannot: ids in [0, vocab) and distinct within a top-k row, finite
    values, and their scale (log-probabilities <= 0 with at most all of the mass; raw logits
    within LOGIT_LIMIT)."""
    if p.indices is not None:
        ids = p.indices
        if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
            return "malformed"
        if p.kind != "samples" and p.k > 1:
            s = ids.sort(dim=-1).values
            if bool((s[:, 1:] == s[:, :-1]).any()):
                return "malformed"
    elif vocab is not None and p.k != vocab:
        return "malformed"
    v = p.values.float()
    if not bool(torch.isfinite(v).all()):
        return "nan"
    if not v.numel():
        return None
    if p.kind == "logits":
        return "malformed" if float(v.abs().max()) > LOGIT_LIMIT else None
    if float(v.max()) > 0.0:
        return "malformed"
    if p.kind == "logprobs":
        lse = torch.logsumexp(v, dim=-1)
        if float(lse.max()) > LSE_SLACK or (p.indices is None and float(lse.min()) < -LSE_SLACK):
            return "malformed"
    return None


def next_tokens(inputs: Any, positions: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The token each prediction row of an exchange batch should predict, [N] int64, -1 where
    none (masked, or past the end); None when the inputs carry no token ids."""
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    ids = ids.long().cpu()
    if isinstance(inputs, dict):  # predictions at every position; the last has no next token
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
    else:  # CLI tokens hold L+1: predictions at the first L
        labels = ids[:, 1:]
    if positions is not None:
        labels = labels.gather(1, positions.long().cpu())
    labels = labels.reshape(-1)
    if mask is not None and mask.numel() != labels.numel():
        return None
    if mask is not None:
        labels = torch.where(mask.cpu().reshape(-1).bool(), labels, torch.full_like(labels, -1))
    return labels


def label_nll(p: CompressedLogits, labels: torch.Tensor | None, vocab: int | None) -> tuple[float, int] | None:
    """(sum, count) of -log p(next token) under the distribution the payload stands for: the
    top-k entries, and the tail mass spread evenly over the V - k other ids. None where it is
    not a distribution (raw top-k logits, sampled ids) or the rows have no labels."""
    if labels is None or vocab is None or labels.numel() != p.num_tokens():
        return None
    if p.kind == "samples" or (p.kind == "logits" and p.indices is not None):
        return None
    keep = labels >= 0
    y = labels.clamp_min(0).to(p.values.device)
    v = p.values.float()
    if p.indices is None:
        logp = torch.log_softmax(v, dim=-1) if p.kind == "logits" else v
        lp = logp.gather(1, y[:, None]).squeeze(1)
    else:
        hit = p.indices.long() == y[:, None]
        tail = (-torch.expm1(torch.logsumexp(v, dim=-1))).clamp_min(TAIL_FLOOR)
        spread = tail.log() - math.log(max(vocab - p.k, 1))
        lp = torch.where(hit.any(dim=1), torch.where(hit, v, torch.zeros_like(v)).sum(dim=1), spread)
    keep = keep.to(lp.device)
    return float(-(lp[keep]).sum()), int(keep.sum())


@dataclass
class Verdict:
    """One round's decision, the same on every rank of my group."""

    reasons: list[str | None]
    """Per received peer: why it is skipped, or None (used)."""
    my_nll: float | None = None
    peer_nll: list[float | None] | None = None
    """Mean label NLL of mine and each peer's predictions (for the warning line)."""


def judge(peers: list[CompressedLogits], labels: list[torch.Tensor | None], mine: CompressedLogits | None,
          my_labels: torch.Tensor | None, vocab: int | None, group: Any, *, ratio: float = 0.0,
          reports: list[dict | None] | None = None, my_loss: float | None = None,
          groups: list[int] | None = None, history: dict[int, float] | None = None) -> Verdict:
    """Integrity of every peer's rows on this rank, then (ratio > 0) the peer guard, agreed over
    `group` with one all-reduce. `labels[i]` are the next tokens of peer i's rows (its exchange
    batch), `reports[i]` what it says of itself ({"loss", "step"}; None: nothing). `history`
    (peer group -> moving average of log(label NLL ratio), `groups[i]` peer i's group) is
    updated here: the labels check decides on it (LABEL_EMA); without it, on this round alone."""
    n = len(peers)
    if n == 0:
        return Verdict([])
    # per peer: malformed, nan, label NLL sum, label count, rows scored; then mine: sum, count
    stats = torch.zeros(5 * n + 2, dtype=torch.float64)
    for i, p in enumerate(peers):
        why = check_content(p, vocab)
        if why is not None:
            stats[5 * i + (0 if why == "malformed" else 1)] = 1.0
        elif ratio > 0:
            scored = label_nll(p, labels[i], vocab)
            if scored is not None:
                stats[5 * i + 2: 5 * i + 5] = torch.tensor([scored[0], scored[1], 1.0], dtype=torch.float64)
    if ratio > 0 and mine is not None:
        scored = label_nll(mine, my_labels, vocab)
        if scored is not None:
            stats[-2:] = torch.tensor(scored, dtype=torch.float64)
    comm.all_reduce(stats, group=group)
    my_nll = float(stats[-2] / stats[-1]) if stats[-1] > 0 else None
    reasons: list[str | None] = []
    peer_nll: list[float | None] = []
    for i in range(n):
        bad, nan, total, count, _ = (float(x) for x in stats[5 * i: 5 * i + 5])
        nll = total / count if count > 0 else None
        peer_nll.append(nll)
        report = (reports[i] if reports else None) or {}
        if bad > 0:
            reasons.append("malformed")
        elif nan > 0:
            reasons.append("nan")
        elif ratio > 0 and _worse(report.get("loss"), my_loss, ratio):
            reasons.append("loss")
        elif ratio > 0 and _labels_worse(nll, my_nll, ratio, groups[i] if groups else i, history):
            reasons.append("labels")
        else:
            reasons.append(None)
    return Verdict(reasons, my_nll, peer_nll)


def _labels_worse(nll: float | None, mine: float | None, ratio: float, peer: int,
                  history: dict[int, float] | None) -> bool:
    """The peer's label NLL over mine above `ratio`, on the moving average of the log-ratio."""
    if nll is None or mine is None or mine <= 0:
        return False
    if history is None:
        return _worse(nll, mine, ratio)
    r = math.log(max(nll, 1e-9) / mine)
    history[peer] = r if peer not in history else LABEL_EMA * history[peer] + (1 - LABEL_EMA) * r
    return history[peer] > math.log(ratio)


def _worse(theirs: float | None, mine: float | None, ratio: float) -> bool:
    """theirs > ratio x mine, both known (a report that is not a finite number counts as worse:
    a peer whose own loss is NaN or Inf is not a teacher)."""
    if theirs is None or mine is None or not math.isfinite(mine) or mine <= 0:
        return False
    try:
        theirs = float(theirs)
    except (TypeError, ValueError):
        return True
    return not math.isfinite(theirs) or theirs > ratio * mine
