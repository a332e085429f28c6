"""`codistill-ds train`: set up one rank of a codistillation job and run the loop.

Order matters for failing fast: the config is validated and the corpus tokenized *before* the
process group exists, so a bad field or a bad data file stops every rank with the same message
instead of leaving some ranks blocked in a collective the others never reach.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from codistill_ds.distributed import comm
from codistill_ds.distributed import env as rankinfo
from codistill_ds.run.checkpoint import Resume, Saver, latest_checkpoint, resolve_resume, restore, set_rng_state
from codistill_ds.config import Config, ConfigError, save_config
from codistill_ds.data.streams import DataError, build_corpus, load_tokenizer
from codistill_ds.run.watchdog import (
    NonFiniteLoss,
    Watchdog,
    check_finite_loss,
    check_peers_compatible,
    fingerprint,
)
from codistill_ds.config.accelerate_env import apply_launch_env
from codistill_ds.run.loop import CodistillLoop
from codistill_ds.run.metrics import MetricsWriter, write_summary
from codistill_ds.backends.model import ModelRecipe
from codistill_ds.distributed.topology import Layout, Topology, TopologyError, build_group_job_topology, build_topology
from codistill_ds.config.validation import validate


def prepare(cfg: Config):
    """Everything that can fail without talking to other ranks: config, topology, data."""
    world = rankinfo.env_world_size()
    applied = apply_launch_env(cfg)  # under `accelerate launch`, its YAML picks the engine
    if applied and rankinfo.env_rank() == 0:
        print(f"codistill-ds: from accelerate launch: {', '.join(applied)}", file=sys.stderr, flush=True)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    validate(cfg, world, tokenizer.vocab_size)
    if cfg.backend.name == "fsdp":
        from importlib.util import find_spec

        if find_spec("codistill_ds.backends.fsdp") is None:
            raise ConfigError("backend.name", "backend 'fsdp' is not available in this version")
    if separate_group_jobs(cfg):
        from codistill_ds.exchange.transport.ft import check_reachable

        check_reachable(cfg.codistill.lighthouse or os.environ["TORCHFT_LIGHTHOUSE"], LIGHTHOUSE_CONNECT_S)
        layout = Layout(world, 1, rankinfo.env_rank(), first_group=cfg.codistill.group_id)
    else:
        layout = Layout(world, cfg.codistill.groups if cfg.codistill.enabled else 1, rankinfo.env_rank())
    corpus = build_corpus(cfg.data, tokenizer)
    return layout, corpus


LIGHTHOUSE_CONNECT_S = 10.0
"""How long a group job tries to reach the Lighthouse at start before it gives up."""


def separate_group_jobs(cfg: Config) -> bool:
    """`transport: torchft`: this job is one codistillation group; its peers are other jobs."""
    return cfg.codistill.enabled and cfg.codistill.transport == "torchft"


def build_ft_transport(cfg: Config, topology: Topology, corpus, vocab_size: int):
    """The leader joins the Lighthouse with this group's exchange contract; every rank gets the
    transport (non-leaders only gather and scatter through it)."""
    from codistill_ds.exchange.engine import ExchangeSettings
    from codistill_ds.exchange.transport.ft import LighthouseMember, TorchFTTransport, exchange_contract
    from codistill_ds.run.watchdog import fingerprint

    cd, d = cfg.codistill, cfg.data
    member = None
    if topology.layout.is_leader:
        contract = exchange_contract(
            vocab_size, fingerprint(cfg, vocab_size, 0, corpus.train)["corpus"], cfg.seed,
            d.exchange_batch_size or d.micro_batch_size * topology.group_size, d.seq_len,
            cd.topk, cd.dtype, ExchangeSettings.from_config(cd).kind, cd.temperature, cd.index_dtype,
            cd.token_fraction)
        member = LighthouseMember(cd.lighthouse or os.environ["TORCHFT_LIGHTHOUSE"], cd.group_id,
                                  contract, cd.exchange_timeout_s)
    return TorchFTTransport(topology, member)


def build_backend(cfg: Config, recipe: ModelRecipe, topology, bf16: bool):
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


@dataclass
class Job:
    """One rank's live pieces; tests reach into them (engine partitions, exchanged logits)."""

    cfg: Config
    topology: Topology
    backend: object
    loop: CodistillLoop
    n_params: int
    transport: object = None
    """The torchft transport when groups are separate jobs (the start-up join uses it)."""


def build_job(cfg: Config) -> Job:
    """Validate, load data, then create process groups, the replica and its sharded backend."""
    rankinfo.prepare_accelerator_env()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    layout, corpus = prepare(cfg)
    if cfg.backend.name == "deepspeed" or cfg.codistill.mode == "weights":
        rankinfo.skip_deepspeed_shm_op()
    rankinfo.init_distributed(cfg.backend.timeout_s)
    ft = separate_group_jobs(cfg)
    if ft:
        topology = build_group_job_topology(cfg.codistill.group_id, cfg.codistill.groups)
    else:
        topology = build_topology(layout.groups, comm.resolve_exchange_backend(
            cfg.codistill.exchange_backend, torch.cuda.is_available()))
    seed = cfg.seed + (0 if cfg.codistill.same_init else topology.group_id)
    torch.manual_seed(seed)
    recipe = ModelRecipe(cfg.model, corpus.vocab_size, cfg.optim.dropout, seed)
    n_params = recipe.num_parameters()  # on the meta device: no weights yet
    # Before the replica is built: a group whose ranks disagree on the model would hang in the
    # sharded construction, and ZeRO-3's world-wide startup would fail obscurely.
    check_peers_compatible(topology.layout, fingerprint(cfg, corpus.vocab_size, n_params, corpus.train))
    backend = build_backend(cfg, recipe, topology, use_bf16(cfg))
    if topology.rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    comm.barrier()
    writer = MetricsWriter(cfg.run_dir, enabled=topology.layout.is_leader,
                           report_to=cfg.train.report_to, group=topology.group_id)
    transport = build_ft_transport(cfg, topology, corpus, corpus.vocab_size) if ft else None
    loop = CodistillLoop(cfg, topology, backend, corpus, writer, rankinfo.device(), transport)
    return Job(cfg, topology, backend, loop, n_params, transport)


def run(cfg: Config) -> dict:
    """Train this rank's share of the job; returns the summary (on every rank).

    Resumes when asked (`train.resume`, always after a torchrun restart), checkpoints every
    `train.save_interval` steps, and turns a lost peer or a diverged group into one message and
    a non-zero exit instead of a hang (health.py)."""
    resume = resolve_resume(cfg, rankinfo.env_world_size(), rankinfo.restart_count())
    job = build_job(cfg)
    watchdog = Watchdog(cfg.run_dir, job.topology.layout, cfg.backend.peer_timeout_s,
                        cfg.backend.timeout_s, lambda: latest_checkpoint(cfg.run_dir)).start()
    try:
        return _train(job, resume, watchdog)
    except NonFiniteLoss as err:
        watchdog.stop_group(err)
        raise
    except (ConfigError, DataError, TopologyError):
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
            _join_groups(job)
    watchdog.resumed(start_step)
    saver = Saver(job)
    progress = _progress_bar(cfg, start_step) if job.topology.rank == 0 else None
    if rng is not None:
        set_rng_state(rng)
    start = time.perf_counter()

    def after_step(steps_done: int, record: dict) -> None:
        check_finite_loss(record["loss"], job.topology.group, job.topology.layout, steps_done)
        watchdog.completed(steps_done)
        if saver.due(steps_done):
            with watchdog.slow(f"saving checkpoint step_{steps_done}"):
                saver.save(steps_done)

    state = job.loop.run(start_step, progress, after_step)
    if progress is not None:
        progress.close()
    with watchdog.slow("the end-of-run summary"):
        summary = _summarize(cfg, job.topology, job.loop, state, job.n_params, time.perf_counter() - start)
    if job.topology.rank == 0:
        write_summary(cfg.run_dir, summary)
        print(format_table(summary), flush=True)
    return summary


def _join_groups(job: Job) -> None:
    """Every start waits (up to `codistill.join_timeout_s`) until all groups are present: a fresh
    or resumed experiment's first exchange then has every peer, and a group restarted while the
    others run is present as soon as they reach their next round."""
    cd = job.cfg.codistill
    present = job.transport.join(cd.groups, cd.join_timeout_s)
    if job.topology.rank == 0:
        note = "" if present >= cd.groups else f" after {cd.join_timeout_s:.0f}s; starting without the others"
        print(f"codistill-ds: group {cd.group_id}: {present} of {cd.groups} groups present{note}",
              file=sys.stderr, flush=True)


def _progress_bar(cfg: Config, start_step: int = 0):
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start_step, desc="codistill", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def _summarize(cfg: Config, topology, loop, state, n_params: int, wall_s: float) -> dict:
    """Per-group results gathered from every rank (the table needs all groups on rank 0)."""
    mine = {
        "rank": topology.rank, "group": topology.group_id,
        "cross_group_bytes": loop.cross_group_bytes(),
        "last": state.last, "best_val_loss": state.best_val, "val_history": state.val_history,
        "peak_memory_bytes": peak_memory_bytes(),
    }
    everyone = comm.all_gather_object(mine)
    groups = []
    for g in sorted({r["group"] for r in everyone}):  # one group per job under transport torchft
        ranks = [r for r in everyone if r["group"] == g]
        lead = ranks[0]
        groups.append({
            "group": g,
            "final_loss": lead["last"].get("loss"),
            "final_val_loss": lead["last"].get("val_loss"),
            "best_val_loss": lead["best_val_loss"],
            "agreement": lead["last"].get("agreement"),
            "cross_group_bytes": sum(r["cross_group_bytes"] for r in ranks),
            "cross_group_bytes_per_rank": [r["cross_group_bytes"] for r in ranks],
            "tokens": lead["last"].get("tokens"),
            "val_history": lead["val_history"],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        })
    return {
        "world_size": topology.layout.world_size, "groups": topology.groups,
        "ranks_per_group": topology.group_size, "params": n_params, "steps": cfg.train.steps,
        "wall_s": wall_s, "backend": cfg.backend.name, "route": cfg.codistill.route,
        "codistill": loop.codistill, "per_group": groups,
        "compute_dtype": str(getattr(loop.backend, "compute_dtype", None)),  # of the last forward
    }


def peak_memory_bytes() -> int:
    """This rank's peak: CUDA memory allocated by PyTorch on a GPU, else the process's peak
    resident set (what `make gpu-check` and the memory estimate of `plan` are compared with)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_table(summary: dict) -> str:
    """The end-of-run table: one row per group."""
    head = f"{'group':>5} {'train loss':>10} {'val loss':>9} {'best val':>9} {'agree':>6} {'x-group bytes':>14}"
    rows = [head, "-" * len(head)]
    for g in summary["per_group"]:
        agree = "-" if g["agreement"] is None else f"{g['agreement']:.3f}"
        rows.append(f"{g['group']:>5} {g['final_loss']:>10.4f} {g['final_val_loss']:>9.4f} "
                    f"{g['best_val_loss']:>9.4f} {agree:>6} {g['cross_group_bytes']:>14,}")
    rows.append(f"{summary['groups']} groups x {summary['ranks_per_group']} ranks, "
                f"{summary['params']:,} params, {summary['steps']} steps, {summary['wall_s']:.1f}s")
    return "\n".join(rows)


def main_guarded(cfg: Config) -> int:
    """Turn input errors into one line on stderr and exit code 2, on every rank."""
    try:
        run(cfg)
    except (ConfigError, DataError, TopologyError) as err:
        from codistill_ds.cli import report_input_error

        rankinfo.destroy()
        return report_input_error(err)
    except BaseException:
        rankinfo.destroy()
        raise
    rankinfo.shutdown()
    return 0
