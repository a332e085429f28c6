"""One rank of a `codistill-ds train` job: set it up, run the loop, summarize.

Order matters for failing fast: the config is validated and the corpus tokenized *before* the
process group exists, so a bad field or a bad data file stops every rank with the same message
instead of leaving some ranks blocked in a collective the others never reach. Everything about
the codistillation itself (axes, seed, transport, engine, join) comes from `exchange/setup.py`,
the path the Trainer and the own-loop API take too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from codistill_ds.backends.model import ModelRecipe
from codistill_ds.backends.pretrained import (
    check_checkpoint,
    checkpoint_vocab_size,
    weights_folder,
)
from codistill_ds.config import Config, ConfigError, save_config
from codistill_ds.config.accelerate_env import apply_launch_env
from codistill_ds.config.validation import validate
from codistill_ds.data.corpus import Corpus, build_corpus, corpus_digest
from codistill_ds.data.sources import DataError
from codistill_ds.data.tokenizers import load_tokenizer, resolve_tokenizer
from codistill_ds.distributed import comm
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.axes import ParallelDims, TopologyError
from codistill_ds.distributed.topology import Topology
from codistill_ds.exchange import setup
from codistill_ds.exchange.engine import ExchangeSettings
from codistill_ds.exchange.transport.base import Transport
from codistill_ds.run.checkpoint import (
    Resume,
    Saver,
    latest_checkpoint,
    resolve_resume,
    restore,
    set_rng_state,
)
from codistill_ds.run.guards import NonFiniteLoss, check_finite_loss
from codistill_ds.run.handshake import check_peers_compatible, fingerprint
from codistill_ds.run.loop import CodistillLoop, LoopHooks
from codistill_ds.run.metrics import MetricsWriter, write_summary
from codistill_ds.run.summary import format_table, summarize
from codistill_ds.run.watchdog import Watchdog

log = logging.getLogger(__name__)

INPUT_ERRORS = (ConfigError, DataError, TopologyError)
"""What a user can fix: reported as one line and exit code 2 on every rank."""


def prepare(cfg: Config) -> tuple[ParallelDims, Corpus]:
    """Everything that can fail without talking to other ranks: config, axes, Lighthouse, data,
    and a pretrained folder's headers (every tensor there, with the shape the config builds)."""
    world = rankinfo.env_world_size()
    applied = apply_launch_env(cfg)  # under `accelerate launch`, its YAML picks the engine
    if applied and rankinfo.env_rank() == 0:
        log.info("from accelerate launch: %s", ", ".join(applied))
    cfg.data.tokenizer = resolve_tokenizer(cfg.data.tokenizer, cfg.model.name_or_path)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    validate(cfg, world, tokenizer.vocab_size)
    folder = weights_folder(cfg.model)
    vocab = tokenizer.vocab_size
    if folder is not None:  # the run's vocabulary is the checkpoint's embedding
        vocab = checkpoint_vocab_size(folder, tokenizer.vocab_size)
        validate(cfg, world, vocab)
    dims = setup.parallel_dims(cfg.codistill, world, rankinfo.env_rank(), replicate=cfg.parallel.replicate,
                               tp=cfg.parallel.tp)
    if dims.tp > 1:  # heads, KV heads, MLP width and vocabulary split T ways, from the model's own config
        from codistill_ds.backends.model import build_hf_config
        from codistill_ds.backends.tensor_parallel import check_tp_divisible

        check_tp_divisible(build_hf_config(cfg.model, vocab, cfg.optim.dropout), dims.tp)
    if folder is not None:
        check_checkpoint(ModelRecipe(cfg.model, vocab, cfg.optim.dropout, cfg.seed).skeleton(), folder)
    setup.check_lighthouse(cfg.codistill)
    corpus = build_corpus(cfg.data, tokenizer)
    return dims, dataclasses.replace(corpus, vocab_size=vocab)


def build_backend(cfg: Config, recipe: ModelRecipe, topology: Topology, bf16: bool):
    """The one place the backend name turns into an object (imports stay lazy). The backend
    builds the replica from `recipe`, sharded over my group while it is built."""
    if cfg.backend.name == "deepspeed":
        from codistill_ds.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(recipe, cfg, topology, bf16)
    from codistill_ds.backends.fsdp import FSDPBackend

    return FSDPBackend(recipe, cfg, topology, bf16)


def use_bf16(cfg: Config) -> bool:
    if cfg.backend.precision == "bf16":
        return True
    if cfg.backend.precision == "fp32":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def exchange_contract(cfg: Config, topology: Topology, corpus: Corpus, n_params: int = 0) -> dict:
    """What the running groups must share with this one (`transport: torchft`): the tokens and
    wire format, plus the group shape, training stream and model where a mode relies on them."""
    import hashlib

    from codistill_ds.config import config_to_dict
    from codistill_ds.exchange.transport.contract import exchange_contract as contract

    d, cd = cfg.data, cfg.codistill
    model = hashlib.sha1(repr((sorted(config_to_dict(cfg.model).items()), n_params)).encode()).hexdigest()[:16]
    return contract(cd, vocab_size=corpus.vocab_size, corpus_digest=corpus_digest(corpus.train), seed=cfg.seed,
                    exchange_batch_size=d.exchange_batch_size or d.micro_batch_size * topology.data_size,
                    seq_len=d.seq_len, kind=ExchangeSettings.from_config(cd).kind, group_size=topology.group_size,
                    train_stream=(d.micro_batch_size, cfg.train.grad_accum),
                    model=(model, f"{cfg.backend.name} {'bf16' if use_bf16(cfg) else 'fp32'}"))


@dataclass
class Job:
    """One rank's live pieces; tests reach into them (engine partitions, exchanged logits)."""

    cfg: Config
    topology: Topology
    backend: object
    loop: CodistillLoop
    n_params: int
    transport: Transport | None = None


def build_job(cfg: Config, hooks: Sequence[LoopHooks] = ()) -> Job:
    """Validate, load data, then create process groups, the replica and its sharded backend."""
    rankinfo.prepare_accelerator_env()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    dims, corpus = prepare(cfg)
    if cfg.backend.name == "deepspeed" or cfg.codistill.mode == "weights":
        rankinfo.skip_deepspeed_shm_op()
    rankinfo.init_distributed(cfg.backend.timeout_s)
    topology = setup.build_job_topology(cfg.codistill, dims, torch.cuda.is_available())
    seed = setup.group_seed(cfg.seed, cfg.codistill, topology.group_id)
    torch.manual_seed(seed)
    recipe = ModelRecipe(cfg.model, corpus.vocab_size, cfg.optim.dropout, seed, weights_folder(cfg.model))
    n_params = recipe.num_parameters()  # on the meta device: no weights yet
    # Before the replica is built: a group whose ranks disagree on the model would hang in the
    # sharded construction, and ZeRO-3's world-wide startup would fail obscurely.
    check_peers_compatible(topology.dims, fingerprint(cfg, corpus.vocab_size, n_params, corpus.train))
    backend = build_backend(cfg, recipe, topology, use_bf16(cfg))
    if topology.rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    comm.barrier()
    writer = MetricsWriter(cfg.run_dir, enabled=topology.is_leader, report_to=cfg.train.report_to,
                           group=topology.group_id)
    transport, teachers = None, None
    contract = lambda: exchange_contract(cfg, topology, corpus, n_params)  # evaluated only where a member is made
    cd = cfg.codistill
    if cd.enabled and cd.mode == "logits" and topology.groups > 1:
        transport = setup.build_transport(cd, topology, contract)
    elif cd.enabled and cd.mode == "weights" and setup.separate_group_jobs(cd):
        from codistill_ds.exchange.weights import WeightExchange

        rails = setup.ft_rails(cd, topology, setup.lighthouse_member(cd, topology, contract))
        teachers = transport = WeightExchange(topology, backend, cd.interval, ExchangeSettings.from_config(cd, cfg.seed),
                                              rails, cd.stale_teachers)
    loop = CodistillLoop(cfg, topology, backend, corpus, writer, rankinfo.device(), transport if teachers is None else None,
                         hooks, teachers)
    return Job(cfg, topology, backend, loop, n_params, transport)


class _JobHooks(LoopHooks):
    """The CLI's duties after every logged step: the loss guard, the watchdog, checkpoints."""

    def __init__(self, job: Job, watchdog: Watchdog, saver: Saver) -> None:
        self.job, self.watchdog, self.saver = job, watchdog, saver

    def after_step(self, loop: CodistillLoop, steps_done: int, record: dict) -> None:
        t = self.job.topology
        asked = t.is_leader and self.job.transport is not None and os.path.exists(retire_request(self.job.cfg))
        retire = check_finite_loss(record["loss"], t.group, steps_done, asked)
        self.watchdog.completed(steps_done)
        if self.saver.due(steps_done) or (retire and self.job.cfg.train.save_interval):
            with self.watchdog.slow(f"saving checkpoint step_{steps_done}"):
                self.saver.save(steps_done)
        if retire:
            if t.is_leader:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(retire_request(self.job.cfg))  # honoured: a later resume trains on
                log.info("group %d: retiring after step %d on request (%s); the other groups go on "
                         "without it and do not wait for it", t.group_id, steps_done, retire_request(self.job.cfg))
            loop.request_stop()


def retire_request(cfg: Config) -> str:
    """`codistill-ds retire RUN_DIR` writes this file; the group's leader looks for it after each
    step, and the whole group stops after that step and leaves with a retire mark (torchft)."""
    return os.path.join(cfg.run_dir, "RETIRE")


def run(cfg: Config, hooks: Sequence[LoopHooks] = ()) -> dict:
    """Train this rank's share of the job; returns the summary (on every rank).

    Resumes when asked (`train.resume`, always after a torchrun restart), checkpoints every
    `train.save_interval` steps, and turns a lost peer or a diverged group into one message and
    a non-zero exit instead of a hang (watchdog.py, guards.py). `hooks` join the loop."""
    resume = resolve_resume(cfg, rankinfo.env_world_size(), rankinfo.restart_count())
    job = build_job(cfg, hooks)
    watchdog = Watchdog(cfg.run_dir, job.topology.dims, cfg.backend.peer_timeout_s,
                        cfg.backend.timeout_s, lambda: latest_checkpoint(cfg.run_dir)).start()
    try:
        return _train(job, resume, watchdog)
    except NonFiniteLoss as err:
        watchdog.stop_group(err)
        raise
    except INPUT_ERRORS:
        raise
    except Exception as err:
        watchdog.fail(err)  # exits when a peer rank or group is gone; else a bug: traceback
        raise
    finally:
        watchdog.stop()


def _train(job: Job, resume: Resume, watchdog: Watchdog) -> dict:
    cfg = job.cfg
    with watchdog.slow("loading the checkpoint"):
        start_step, rng = restore(job, resume)
    if job.transport is not None:
        with watchdog.slow("waiting for the other groups"):
            setup.join_groups(job.transport, cfg.codistill, job.topology)
    watchdog.resumed(start_step)
    job.loop.hooks.append(_JobHooks(job, watchdog, Saver(job)))
    progress = _progress_bar(cfg, start_step) if job.topology.rank == 0 else None
    if rng is not None:
        set_rng_state(rng)
    start = time.perf_counter()
    state = job.loop.run(start_step, progress)
    if progress is not None:
        progress.close()
    with watchdog.slow("the end-of-run summary"):
        summary = summarize(cfg, job.topology, job.loop, state, job.n_params, time.perf_counter() - start)
    if job.topology.rank == 0:
        write_summary(cfg.run_dir, summary)
        print(format_table(summary), flush=True)
    return summary


def _progress_bar(cfg: Config, start_step: int = 0):
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start_step, desc="codistill", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)
