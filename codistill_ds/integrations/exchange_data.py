"""Exchange batches from a user's dataset, for the Trainer and the own-Accelerate-loop integrations.

Both hand the exchange engine a map-style dataset of tokenized rows and a model that takes
`input_ids`/`attention_mask` (the CLI has token streams instead, `data/streams.py`). What they
share lives here, so that the two integrations draw the same exchange batches:

- `validate_integration`: the library's config checks, before any collective can hang;
- `ExchangeBatches` (+ `distill_mask`, `check_same_exchange_data`): exchange batch e, the same
  rows in every group, rank r's 1/S slice of them;
- `predict_logits`, `logits_of`: the teacher side of an exchange, eval mode, no graph.

Everything else (axes, seed, transport, engine, join, the step schedule) is the CLI's too:
`exchange/setup.py` and `exchange/distiller.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from codistill_ds.config import CodistillConfig, Config, ConfigError
from codistill_ds.config.validation import check_choices, check_numbers, check_topology
from codistill_ds.data.streams import EXCHANGE_STREAM_TAG, EpochPermutation
from codistill_ds.distributed import comm
from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange.batches import ExchangeBatch

MODEL_INPUTS = ("input_ids", "attention_mask")
"""Columns of an exchange example fed to the model; labels are not needed to predict."""


def validate_integration(cfg: CodistillConfig, world_size: int, who: str, plain_run: str) -> None:
    """The library's checks of the codistill section, plus what an integration cannot do.

    `who` names the integration in the messages; `plain_run` says how to train without
    codistillation there (these integrations always codistill)."""
    full = Config(codistill=cfg)
    check_topology(full, world_size)
    check_choices(full)
    check_numbers(full)
    if not cfg.enabled:
        raise ConfigError("codistill.enabled", f"{who} always codistills; for a plain run {plain_run}")
    if cfg.exchange_batch != "shared":
        raise ConfigError("codistill.exchange_batch", f"{who} supports 'shared' only: a group cannot "
                          "know its peers' batches")
    if cfg.mode != "logits":
        raise ConfigError("codistill.mode", f"{who} exchanges predictions ('logits') only: its teachers "
                          "would need the model built by the host framework; use the CLI for 'weights'")


class ExchangeBatches:
    """Exchange batch e: the same rows on every group (seeded order), rank r's 1/S slice of them."""

    def __init__(self, dataset: Any, seed: int, batch: int, topology: Topology, collate: Any,
                 device: torch.device, ignore_index: int = -100) -> None:
        if batch % topology.data_size:
            raise ConfigError("exchange_batch_size", f"{batch} is not divisible by the "
                              f"{topology.data_size} data ranks per group")
        self.dataset, self.collate, self.device, self.ignore_index = dataset, collate, device, ignore_index
        self.order = EpochPermutation(len(dataset), seed + EXCHANGE_STREAM_TAG)
        self.batch, self.slice, self.rank = batch, batch // topology.data_size, topology.data_rank

    def __call__(self, step: int, e: int) -> ExchangeBatch:
        start = e * self.batch + self.rank * self.slice
        rows = [self.dataset[int(i)] for i in self.order(np.arange(start, start + self.slice))]
        keys = [k for k in (*MODEL_INPUTS, "labels") if k in rows[0]]
        batch = self.collate([{k: row[k] for k in keys} for row in rows])
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in MODEL_INPUTS}
        return ExchangeBatch(inputs, distill_mask(inputs, batch.get("labels"), self.ignore_index),
                             range(self.rank * self.slice, (self.rank + 1) * self.slice))


def distill_mask(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                 ignore_index: int) -> torch.Tensor | None:
    """Positions whose prediction is distilled: attended, and not predicting an ignored label.

    The logits at position t predict token t+1, so a label of `ignore_index` at t+1 (padding, a
    prompt) masks position t, as it masks that token's cross-entropy; the last position has no
    next label and is kept when attended."""
    mask = inputs.get("attention_mask")
    mask = None if mask is None else mask.bool()
    if labels is not None:
        labels = labels.to(inputs["input_ids"].device)
        keep = torch.ones_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != ignore_index
        mask = keep if mask is None else mask & keep
    return None if mask is None else mask.flatten()


def check_same_exchange_data(dataset: Any, dims: ParallelDims) -> str:
    """Every rank must draw exchange batches from the same rows, or the groups distill toward
    predictions on other tokens without any error: one small all-gather of the dataset's length
    and a digest of three rows, the integrations' `health.check_peers_compatible`."""
    n = len(dataset)
    rows = [_plain(dataset[i]) for i in sorted({0, n // 2, n - 1})] if n else []
    mine = (n, hashlib.sha1(repr(rows).encode()).hexdigest()[:16])
    everyone = comm.all_gather_object(mine)
    if len(set(everyone)) > 1:
        seen = {v: [r for r, w in enumerate(everyone) if w == v] for v in dict.fromkeys(everyone)}
        detail = "; ".join(f"{v[0]} rows (digest {v[1]}) on ranks {ranks}" for v, ranks in seen.items())
        raise ConfigError("train_dataset", f"ranks of a {dims.groups}-group job hold different exchange data: "
                          f"{detail}; build the dataset the same way on every rank (same files, order and seed)")
    return f"{mine[0]}:{mine[1]}"


def _plain(value: Any) -> Any:
    """Tensors as lists (a tensor's repr names its device, which differs by rank on GPUs)."""
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- the model's side ----------------------------------------------------------------------

def logits_of(outputs: Any) -> torch.Tensor:
    """[B*L, V] logits of a model's output: a Hugging Face output, a tuple, or a tensor."""
    if torch.is_tensor(outputs):
        logits = outputs
    else:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    return logits.flatten(0, 1)


def predict_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher side of an exchange: eval mode (no dropout), no graph; the mode is restored.
    The engine compresses and swaps what this returns."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return logits_of(model(**inputs))
    finally:
        model.train(was_training)




# ---- setup, as both integrations need it ---------------------------------------------------------

def topology_for(cd: CodistillConfig, dims: ParallelDims) -> Topology:
    """The process groups (a collective over the whole world; once per job), after the host
    framework created the default process group."""
    import torch.distributed as dist

    from codistill_ds.exchange import setup

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: create the Accelerator (or "
                           "TrainingArguments) first, under a distributed launcher")
    return setup.build_job_topology(cd, dims, torch.cuda.is_available())


def dataset_contract(cd: CodistillConfig, dataset: Any, digest: str, seed: int, batch: int, vocab_size: int,
                     group_size: int) -> dict:
    """The exchange contract of a group job whose exchange batches come from `dataset`: its
    digest stands for the corpus, the model's vocabulary for the tokenizer (and the group size,
    which route rails pairs rank by rank)."""
    from codistill_ds.exchange.engine import ExchangeSettings
    from codistill_ds.exchange.transport.contract import exchange_contract

    first = dataset[0] if len(dataset) else {}
    seq_len = len(first["input_ids"]) if isinstance(first, dict) and "input_ids" in first else -1
    return exchange_contract(cd, vocab_size=vocab_size, corpus_digest=digest, seed=seed, exchange_batch_size=batch,
                             seq_len=seq_len, kind=ExchangeSettings.from_config(cd).kind, group_size=group_size)


def engine_for_dataset(cd: CodistillConfig, topology: Topology, *, dataset: Any, digest: str, seed: int,
                       batch: int, collate: Any, device: torch.device, vocab_size: Callable[[], int],
                       transport: Any = None):
    """The exchange engine over exchange batches drawn from `dataset` (`setup.build_engine`);
    the transport is the given one, or the configured one (`setup.build_transport`)."""
    from codistill_ds.exchange import setup

    batches = ExchangeBatches(dataset, seed, batch, topology, collate, device, cd.ignore_index)
    if transport is None:
        transport = setup.build_transport(
            cd, topology, lambda: dataset_contract(cd, dataset, digest, seed, batch, vocab_size(), topology.group_size))
    return setup.build_engine(cd, topology, transport, batches, seed)


def model_vocab_size(model: Any) -> int:
    """The vocabulary a (possibly wrapped) Hugging Face model predicts over; 0 when unknown."""
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


# ---- every step ------------------------------------------------------------------------------------

def student_term(distiller: Any, model: Any, due: list) -> torch.Tensor | None:
    """alpha * D(peers || me) on the due exchange batches, the student forward in train mode on
    each (with its graph); None when nothing is due or alpha is 0 (`Distiller.loss`)."""
    if not due or distiller.alpha == 0:
        return None
    return distiller.loss([logits_of(model(**b.inputs)) for b in due], due)


def integration_metrics(distiller: Any, topology: Topology) -> dict[str, float]:
    """Group-level figures of the exchange for a log record: the latest distillation value (a
    group mean: a collective over my group when there is one) and agreement, and this step's
    alpha, bytes and timings. Every rank of the group calls it at the same steps."""
    f = distiller.figures()
    out = {"alpha": f["alpha"], "group": topology.group_id, "cross_group_bytes": distiller.bytes_sent,
           "exchange_ms": f["exchange_ms"], "exchange_compute_ms": f["exchange_compute_ms"],
           "skipped_peers": f["skipped_peers"],  # by reason as numbers: trackers log scalars only
           **{f"skipped_{why}": n for why, n in f["skipped_reasons"].items()}}
    if f["peers"] is not None:
        out["peers"] = f["peers"]
    if distiller.latest_distill is not None:
        out["distill_loss"] = comm.group_mean(distiller.latest_distill, topology.group)
    if distiller.latest_agreement is not None:
        out["agreement"] = distiller.latest_agreement
    return out
