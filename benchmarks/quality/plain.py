"""One process training one replica: the product's own loop over its one-process backend.

The DiLoCo workers (diloco.py) and the offline-distilled student (hetero.py) cannot run inside
`codistill-ds train`: torchft's DiLoCo wraps a plain `torch.optim` optimizer, and an offline
teacher is not a peer. They run the library's `CodistillLoop` itself, on `LocalBackend` (the
whole replica on this process, AdamW with the decayed/non-decayed groups, accumulation and
clipping as the sharded backends do) in a world of one rank that is group `group` of `groups`:
the same data shard, schedules, distillation step and validation windows as the CLI, from the
same `--set` list. tests/dist/test_quality_bench.py checks it against the CLI: with no outer
step yet, a DiLoCo worker's training losses equal the `independent` arm's group 0 losses.
"""

from __future__ import annotations

import copy

import torch

from codistill_ds.backends.local import LocalBackend
from codistill_ds.backends.model import ModelRecipe, count_parameters
from codistill_ds.config import Config
from codistill_ds.data.corpus import Corpus
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.distributed.topology import build_topology
from codistill_ds.exchange.wire import CompressedLogits, compress, wire_dtype
from codistill_ds.run.loop import CodistillLoop, Teachers
from codistill_ds.run.metrics import MetricsWriter


class OfflineTeacher(Teachers):
    """A frozen model predicting on the student's own batch, compressed exactly as a peer's
    predictions would be (top-k, wire dtype, ids) for the loop's distillation step."""

    def __init__(self, model: torch.nn.Module, cfg: Config, group: int = 0) -> None:
        self.model, self.cd = model.eval(), cfg.codistill
        self.peer_groups, self.bytes_sent = [group], 0

    def refresh(self, step: int) -> float | None:
        return None

    @torch.no_grad()
    def targets(self, input_ids: torch.Tensor) -> list[CompressedLogits]:
        cd = self.cd
        logits = self.model(input_ids=input_ids, use_cache=False).logits.flatten(0, 1)
        kind = "logits" if cd.loss == "mse" else "logprobs"
        return [compress(logits, cd.topk, wire_dtype(cd.dtype), kind, cd.temperature, cd.index_dtype)]


class PlainTrainer:
    """Group `group` of `groups`, initialized with `init_seed`, trained by `CodistillLoop` on one
    process; with `teachers`, distilled toward them every step (alpha from the config)."""

    def __init__(self, cfg: Config, corpus: Corpus, group: int, groups: int, init_seed: int,
                 teachers: Teachers | None = None) -> None:
        cfg = copy.deepcopy(cfg)
        cfg.codistill.enabled = False  # no exchange: a group of its own (teachers, if any, are local)
        rankinfo.init_distributed()  # a world of one rank: the loop's group collectives are local
        dims = ParallelDims(world_size=1, groups=1, rank=0, first_group=group, total_groups=groups)
        self.cfg, self.topology = cfg, build_topology(dims)
        recipe = ModelRecipe(cfg.model, corpus.vocab_size, cfg.optim.dropout, init_seed)
        self.backend = LocalBackend(recipe, cfg)
        self.loop = CodistillLoop(cfg, self.topology, self.backend, corpus, MetricsWriter("", enabled=False),
                                  torch.device("cpu"), teachers=teachers)
        self.model, self.optimizer = self.backend.module, self.backend.optimizer
        self.params = count_parameters(self.model)
        self.stream = self.loop.train_stream
        self.last: dict = {}
        """The loop's record of the latest update (step_ms, cpu_ms, ...)."""

    def train_step(self, step: int) -> float:
        """One update (the loop's step: schedules, micro-batches, distillation, clip, AdamW);
        returns the mean cross-entropy of its micro-batches. `optimizer.step()` is where
        torchft's DiLoCo hooks in (its outer step runs after every H-th call)."""
        self.last = self.loop.train_step(step)
        return self.last["loss"]

    def evaluate(self) -> float:
        """Mean next-token loss on the validation windows every arm scores (as the CLI's)."""
        return self.loop.evaluate()
