"""Driving the exchange engine from a user's model and dataset, outside the project's CLI loop.

The Hugging Face Trainer integration (`hf_callback.py`) and the own-Accelerate-loop one
(`accelerate_loop.py`) both hand the exchange engine (`engine.py`) a map-style dataset of
tokenized rows and a model that takes `input_ids`/`attention_mask`, and both run in a job whose
world is either every group (`transport: world`) or one group (`transport: torchft`). What they
share lives here, so that the two integrations draw the same exchange batches, build the same
topology and transport, and report the same figures:

- `validate_integration`: the library's config checks, before any collective can hang;
- `topology_for`: the process groups of either transport;
- `ExchangeBatches` (+ `distill_mask`, `check_same_exchange_data`): exchange batch e, the same
  rows in every group, rank r's 1/S slice of them;
- `group_job_transport`, `join_groups`: the torchft route between group jobs;
- `predict_logits`, `logits_of`: the teacher side of an exchange, eval mode, no graph;
- `DistillSteps`: alpha(t), the exchange of a step, the distillation term, the figures to log.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from codistill_ds.distributed import comm
from codistill_ds.config import CodistillConfig, Config, ConfigError
from codistill_ds.data.streams import EXCHANGE_STREAM_TAG, _EpochPermutation
from codistill_ds.exchange.engine import ExchangeBatch, ExchangeEngine, ExchangeSettings, TargetBatch, Transport
from codistill_ds.schedules import alpha_at
from codistill_ds.distributed.topology import Layout, Topology, build_group_job_topology, build_topology
from codistill_ds.config.validation import check_choices, check_numbers, check_topology

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


def lighthouse_url(cfg: CodistillConfig) -> str:
    """`transport: torchft`: the Lighthouse from the config, else torchft's own variable."""
    return cfg.lighthouse or os.environ["TORCHFT_LIGHTHOUSE"]


def layout_for(cfg: CodistillConfig, world_size: int, rank: int) -> Layout:
    """One job holds every group (`world`), or this job is group `group_id` (`torchft`)."""
    if cfg.transport == "torchft":
        return Layout(world_size, 1, rank, first_group=cfg.group_id)
    return Layout(world_size, cfg.groups, rank)


def topology_for(cfg: CodistillConfig) -> Topology:
    """Create the process groups (a collective over the whole world; once per job)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: create the Accelerator (or "
                           "TrainingArguments) first, under a distributed launcher")
    if cfg.transport == "torchft":
        return build_group_job_topology(cfg.group_id, cfg.groups)
    return build_topology(cfg.groups)


class ExchangeBatches:
    """Exchange batch e: the same rows on every group (seeded order), rank r's 1/S slice of them."""

    def __init__(self, dataset: Any, seed: int, batch: int, topology: Topology, collate: Any,
                 device: torch.device, ignore_index: int = -100) -> None:
        if batch % topology.group_size:
            raise ConfigError("exchange_batch_size", f"{batch} is not divisible by the "
                              f"{topology.group_size} ranks per group")
        self.dataset, self.collate, self.device, self.ignore_index = dataset, collate, device, ignore_index
        self.order = _EpochPermutation(len(dataset), seed + EXCHANGE_STREAM_TAG)
        self.batch, self.slice, self.rank = batch, batch // topology.group_size, topology.group_rank

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


def check_same_exchange_data(dataset: Any, layout: Layout) -> str:
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
        raise ConfigError("train_dataset", f"ranks of a {layout.groups}-group job hold different exchange data: "
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


# ---- transport torchft: one job per group -------------------------------------------------

def group_job_transport(cfg: CodistillConfig, topology: Topology, dataset: Any, digest: str, seed: int,
                        batch: int, vocab_size: int) -> Transport:
    """The group's leader joins the Lighthouse with this job's exchange contract: the exchange
    data's digest stands for the corpus, the model's vocabulary for the tokenizer."""
    from codistill_ds.exchange.transport.ft import LighthouseMember, TorchFTTransport, exchange_contract

    member = None
    if topology.layout.is_leader:
        first = dataset[0] if len(dataset) else {}
        seq_len = len(first["input_ids"]) if isinstance(first, dict) and "input_ids" in first else -1
        contract = exchange_contract(vocab_size, digest, seed, batch, seq_len, cfg.topk, cfg.dtype,
                                     ExchangeSettings.from_config(cfg).kind, cfg.temperature,
                                     cfg.index_dtype, cfg.token_fraction)
        member = LighthouseMember(lighthouse_url(cfg), cfg.group_id, contract, cfg.exchange_timeout_s)
    return TorchFTTransport(topology, member)


def join_groups(engine: ExchangeEngine, cfg: CodistillConfig, topology: Topology) -> None:
    """Groups in separate jobs wait for each other before the first exchange (up to
    `join_timeout_s`); a no-op for one job holding every group."""
    transport = engine.transport
    if not hasattr(transport, "join"):
        return
    present = transport.join(cfg.groups, cfg.join_timeout_s)
    if topology.rank == 0:
        print(f"codistill-ds: group {cfg.group_id}: {present} of {cfg.groups} groups present",
              file=sys.stderr, flush=True)


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


class DistillSteps:
    """One optimizer step of codistillation as an integration sees it: alpha(t), the exchange the
    engine runs at this step, the distillation term on the peer targets due now, and the group
    figures to log. The Trainer callback and the own-loop `Codistill` both drive the engine
    through it (the CLI loop has its own, in loop.py)."""

    def __init__(self, engine: ExchangeEngine, cfg: CodistillConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.alpha = 0.0
        self.distill_value: torch.Tensor | None = None
        """The latest distillation loss: the term's, or the engine's evaluation during burn-in."""
        self.agreement: float | None = None
        """Of the latest completed exchange: logged at every logging step, like distill_loss."""

    def exchange(self, step: int, predict: Any) -> list[TargetBatch]:
        """alpha(step), then the engine's step (an exchange when one is scheduled, `predict` the
        teacher side); returns the peer targets due now."""
        cd = self.cfg
        self.alpha = alpha_at(step, cd.alpha, cd.burn_in, cd.ramp)
        due = self.engine.step(step, predict)
        stats = self.engine.stats
        if stats.distill_eval is not None:  # logged during burn-in too, like the CLI loop
            self.distill_value = torch.tensor(stats.distill_eval)
        if stats.agreement is not None:
            self.agreement = stats.agreement
        return due

    def term(self, model: Any, due: list[TargetBatch]) -> torch.Tensor | None:
        """alpha * D(peers || me) on the due exchange batches, the student forward in train mode
        (with its graph); None when nothing is due or alpha is 0."""
        if not due or self.alpha == 0:
            return None
        d = self.engine.distill_loss([logits_of(model(**b.inputs)) for b in due], due)
        self.distill_value = d.detach()
        return self.alpha * d

    def metrics(self, topology: Topology) -> dict[str, float]:
        """Group-level figures of the exchange for a log record; a collective over my group when
        there is a distillation value (every rank of the group calls it)."""
        engine, stats = self.engine, self.engine.stats
        out = {"alpha": self.alpha, "group": topology.group_id, "cross_group_bytes": engine.bytes_sent,
               "exchange_ms": stats.exchange_ms, "exchange_compute_ms": stats.exchange_compute_ms,
               "skipped_peers": engine.skipped_peers}
        if stats.peers is not None:
            out["peers"] = stats.peers
        if self.distill_value is not None:
            out["distill_loss"] = group_mean(self.distill_value, topology)
        if self.agreement is not None:
            out["agreement"] = self.agreement
        return out


def group_mean(value: torch.Tensor | float, topology: Topology) -> float:
    """Mean of one number over the ranks of my group, in float64 (a collective over it)."""
    v = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(1).clone()
    comm.all_reduce(v, group=topology.group)
    return (v / topology.group_size).item()
