"""The start-of-run handshake: every rank of a job agrees on what makes predictions comparable.

Groups disagree on the vocabulary, the model or the data when different tokenizer files or
command lines reach different nodes. `check_peers_compatible` compares every rank's
`fingerprint` once at start, and every rank raises the same `ConfigError` naming the field
before any training collective (a peer group with another vocabulary would otherwise fail
deep inside the first exchange, or inside ZeRO-3's world-wide trace, or train on nonsense).
"""

from __future__ import annotations

from codistill_ds.config import Config, ConfigError, config_to_dict
from codistill_ds.distributed import comm
from codistill_ds.distributed.axes import ParallelDims

_NOT_COMPARED = ("run_dir", "data.train_files", "data.tokenizer", "model.name_or_path",
                 "backend.ds_config", "train.resume")
"""Paths may differ per node; what they load (vocabulary, corpus, model) is compared instead."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint(cfg: Config, vocab_size: int, n_params: int, corpus_train) -> dict:
    """What must be identical on every rank for the exchanged predictions to be comparable.
    `corpus_train` is `Corpus.train`; its digest never reads a whole shard corpus (data.py)."""
    from codistill_ds.data.corpus import corpus_digest

    digest = corpus_digest(corpus_train)
    flat = {k: v for k, v in _flat(config_to_dict(cfg)).items() if k not in _NOT_COMPARED}
    return {"vocab_size": vocab_size, "params": n_params, "corpus": digest, "config": flat}


_FIELD = {"vocab_size": ("data.tokenizer", ("the vocabulary size (so the exchanged predictions "
                                            "and the model heads have different shapes)")),
          "params": ("model", "the model's parameter count"),
          "corpus": ("data.train_files", ("the tokenized training corpus (so the shared "
                                          "exchange batches differ)"))}


def _ranks_text(ranks: list[int], dims: ParallelDims) -> str:
    groups = sorted({dims.group_of(r) for r in ranks})
    return f"ranks {ranks} (group{'s' if len(groups) > 1 else ''} {', '.join(map(str, groups))})"


def _disagreement(values_by_rank: list, dims: ParallelDims) -> str | None:
    seen: dict[str, list[int]] = {}
    for r, v in enumerate(values_by_rank):
        seen.setdefault(repr(v), []).append(r)
    if len(seen) < 2:
        return None
    return "; ".join(f"{v} on {_ranks_text(ranks, dims)}" for v, ranks in seen.items())


def check_peers_compatible(dims: ParallelDims, mine: dict) -> None:
    """One world all-gather at start; every rank raises the same `ConfigError` on a mismatch.

    Without it, a peer group with another vocabulary fails deep inside the first exchange (or
    inside ZeRO-3's world-wide trace) with a shape error, or trains on nonsense targets."""
    everyone = comm.all_gather_object(mine)
    for key, (field, what) in _FIELD.items():
        diff = _disagreement([fp[key] for fp in everyone], dims)
        if diff:
            raise ConfigError(field, f"ranks disagree on {what}: {diff}; in one job (codistill.transport "
                              "'world') every group must use the same tokenizer, data and model (ZeRO-3 traces "
                              "the first step over the whole world); groups with different models or sizes run "
                              "as separate jobs: codistill.transport=torchft")
    keys = sorted(set().union(*(fp["config"] for fp in everyone)))
    for key in keys:
        diff = _disagreement([fp["config"].get(key) for fp in everyone], dims)
        if diff:
            raise ConfigError(key, f"ranks were started with different values: {diff}; start "
                              "every rank with the same config and --set overrides")
