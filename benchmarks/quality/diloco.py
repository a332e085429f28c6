"""The DiLoCo arm: torchft's `DiLoCo` (Douillard et al., arXiv 2311.08105) on the benchmark's model.

Two workers, each its own process and its own torchft replica group of one rank, meet through
a torchft Lighthouse, as in torchft's `local_sgd_integ_test.py` (ProcessGroupGloo + Manager on
CPU). Each worker trains on its half of the corpus like a codistillation group (the same
`TrainStream` shard), with the same model, batch, inner AdamW and schedules as every other arm
(plain.py); every H inner steps `DiLoCo` all-reduces the pseudo-gradients (the change since the
last outer step) and its outer optimizer, Nesterov SGD with lr 0.7 and momentum 0.9 (the
paper's), moves the shared model. Both workers start from one initialization (DiLoCo's workers
are replicas of one model); the outer optimizer is torchft's, not written here.

Records (metrics.jsonl, one writer per worker, as the CLI's groups): the worker's training loss,
`step_ms` and `cpu_ms` of the update (the outer step included, inside the optimizer's step),
`val_loss` of the weights the worker holds (between outer steps they are local; right after
one, the shared model), `global_val_loss` of the last shared model where the two differ, and
`cross_group_bytes`: measured, what a ring all-reduce of the tensors DiLoCo hands to the
manager's all-reduce puts on each worker's link (`count_allreduce`), which for fp32
pseudo-gradients is 2 (W - 1) / W x 4 x P bytes per outer step with W = 2 (docs/design.md
"Counting bytes"; tests/dist/test_quality_bench.py checks the two agree).

    python -m benchmarks.quality.diloco --run-dir D --replica 0 --lighthouse URL --sync-every H \\
        --set KEY=VALUE ...        # one worker; benchmarks/quality runs both through `starter`
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from codistill_ds.config import load_config, save_config
from codistill_ds.data.corpus import build_corpus
from codistill_ds.run.metrics import MetricsWriter

from .plain import PlainTrainer

OUTER_LR = 0.7
OUTER_MOMENTUM = 0.9
WORKERS = 2


def ring_bytes(params: int, workers: int = WORKERS, bytes_per_value: int = 4) -> int:
    """Bytes one worker sends in a ring all-reduce of `params` values."""
    return 2 * (workers - 1) * params * bytes_per_value // workers


class GlobalModel:
    """The shared model after the last outer step (the initialization before the first), so the
    arm can also be scored on what DiLoCo hands out, not only on a worker's local weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.snapshot()

    def snapshot(self) -> None:
        self.weights = [p.detach().clone() for p in self.model.parameters()]

    def evaluate(self, trainer: PlainTrainer) -> float:
        local = [p.detach().clone() for p in self.model.parameters()]
        with torch.no_grad():
            for p, w in zip(self.model.parameters(), self.weights):
                p.copy_(w)
            loss = trainer.evaluate()
            for p, w in zip(self.model.parameters(), local):
                p.copy_(w)
        return loss


def make_manager(replica: int, lighthouse: str, timeout_s: float):
    """A torchft Manager for a one-rank replica group, on its own TCPStore; the workers start
    identical, so no weights are synced at step 0 (init_sync=False)."""
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = datetime.timedelta(seconds=timeout_s)
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), load_state_dict=None, state_dict=None,
                      min_replica_size=WORKERS, use_async_quorum=False, init_sync=False,
                      replica_id=f"diloco_{replica}", store_addr="127.0.0.1", store_port=store.port,
                      rank=0, world_size=1, lighthouse_addr=lighthouse, timeout=timeout,
                      quorum_timeout=datetime.timedelta(hours=2), connect_timeout=timeout)
    return manager, store


def train(args: argparse.Namespace) -> None:
    from torchft.local_sgd import DiLoCo

    cfg = load_config(None, args.set)
    corpus = build_corpus(cfg.data)
    trainer = PlainTrainer(cfg, corpus, args.replica, cfg.codistill.groups, init_seed=cfg.seed)
    run_dir = Path(args.run_dir)
    if args.replica == 0:
        save_config(cfg, str(run_dir / "config.yaml"))
    writer = MetricsWriter(str(run_dir), enabled=True)
    manager, _store = make_manager(args.replica, args.lighthouse, args.timeout_s)
    outer = torch.optim.SGD(trainer.model.parameters(), lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
    shared = GlobalModel(trainer.model)
    H, tc = args.sync_every, cfg.train
    sent = count_allreduce(manager)
    started = time.perf_counter()
    with DiLoCo(manager, [trainer.model], trainer.optimizer, outer, sync_every=H, pin_memory=False):
        for step in range(tc.steps):
            loss = trainer.train_step(step)  # the outer step runs inside, after every H-th update
            done = step + 1
            synced = done % H == 0
            if synced:
                shared.snapshot()
            record = {"step": done, "group": args.replica, "loss": loss, "outer_steps": manager.current_step(),
                      "step_ms": trainer.last["step_ms"], "cpu_ms": trainer.last["cpu_ms"],
                      "cross_group_bytes": sent["ring_bytes"], "wall_s": time.perf_counter() - started,
                      "tokens": done * trainer.stream.sequences_per_step() * cfg.data.seq_len}
            if done % tc.eval_interval == 0 or done == tc.steps:
                record["val_loss"] = trainer.evaluate()
                record["global_val_loss"] = record["val_loss"] if synced else shared.evaluate(trainer)
            if done % tc.log_interval == 0 or "val_loss" in record:
                writer.write(record)
    manager.shutdown(wait=False)


def count_allreduce(manager) -> dict[str, int]:
    """Measure what DiLoCo puts on the wire: every tensor torchft's `DiLoCo` hands to
    `manager.allreduce` (its bytes as passed, dtype and all), converted to the bytes one worker
    sends in a ring all-reduce of them (`ring_bytes`' model, the comm benchmark's). The report's
    boundary bytes are these, not a formula of the parameter count: an outer step that sent
    bf16, skipped a fragment or ran twice would show."""
    counts = {"calls": 0, "tensor_bytes": 0, "ring_bytes": 0}
    allreduce = manager.allreduce

    def counted(tensor, *args, **kwargs):
        nbytes = tensor.numel() * tensor.element_size()
        counts["calls"] += 1
        counts["tensor_bytes"] += nbytes
        counts["ring_bytes"] += 2 * (WORKERS - 1) * nbytes // WORKERS
        return allreduce(tensor, *args, **kwargs)

    manager.allreduce = counted
    return counts


def starter(sets: list[str], sync_every: int, timeout_s: float):
    """A runner.Starter: the Lighthouse (in this process, shut down by the returned cleanup)
    and both workers."""
    from codistill_ds.commands.lighthouse import start_lighthouse

    from .runner import popen

    def start(run_dir: Path) -> tuple[list[subprocess.Popen], Callable[[], None]]:
        os.environ.setdefault("RUST_LOG", "warn")  # the Lighthouse logs every quorum at info
        server, url = start_lighthouse(port=0, bind="127.0.0.1", min_replicas=WORKERS)
        procs = []
        for g in range(WORKERS):
            cmd = [sys.executable, "-m", "benchmarks.quality.diloco", "--run-dir", str(run_dir),
                   "--replica", str(g), "--lighthouse", url, "--sync-every", str(sync_every),
                   "--timeout-s", str(timeout_s)]
            for item in sets:
                cmd += ["--set", item]
            procs.append(popen(cmd, run_dir, f"worker{g}", GLOO_SOCKET_IFNAME="lo"))
        return procs, server.shutdown

    return start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.diloco", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--replica", type=int, required=True, help="worker id: its data shard and replica group")
    p.add_argument("--lighthouse", required=True, help="torchft Lighthouse URL")
    p.add_argument("--sync-every", type=int, required=True, help="H: inner steps per outer step")
    p.add_argument("--timeout-s", type=float, default=600.0, help="collective and connect timeout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
