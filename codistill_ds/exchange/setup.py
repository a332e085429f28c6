"""Setting up a codistillation job, once for every driver: axes, seed, transport, engine, join.

The CLI job (`run/job.py`), the Hugging Face Trainer (`integrations/hf_trainer`) and the
own-Accelerate-loop API (`integrations/accelerate_loop.py`) differ in who builds the model and
the data; everything about the codistillation itself is built here, in this order:

    dims = parallel_dims(cd, world, rank)         pure: fails on a bad topology before any collective
    check_lighthouse(cd)                          transport torchft: the Lighthouse answers at all
    topology = build_job_topology(cd, dims)       the process groups (a world collective)
    seed = group_seed(seed, cd, group_id)         this group's initialization
    transport = build_transport(cd, topology, contract)
    engine = build_engine(cd, topology, transport, batch_for, seed)
    join_groups(transport, cd, topology)          separate group jobs wait for each other

One job holds every group (`transport: world`): the job's world is K x S ranks and the exchange
runs over its process groups. Or this job is one group (`transport: torchft`): its world is
the group, and the groups meet through a torchft Lighthouse (`transport/ft.py`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from codistill_ds.config import CodistillConfig
from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.distributed.topology import Topology, build_topology
from codistill_ds.exchange.batches import ExchangeBatch
from codistill_ds.exchange.engine import ExchangeEngine, ExchangeSettings
from codistill_ds.exchange.transport.base import Transport

log = logging.getLogger(__name__)

LIGHTHOUSE_CONNECT_S = 10.0
"""How long a group job tries to reach the Lighthouse at start before it gives up."""


def separate_group_jobs(cd: CodistillConfig) -> bool:
    """`transport: torchft`: this job is one codistillation group; its peers are other jobs."""
    return cd.enabled and cd.transport == "torchft"


def parallel_dims(cd: CodistillConfig, world_size: int, rank: int, *, replicate: int = 1,
                  tp: int = 1) -> ParallelDims:
    """The axes of this job: every group in it (`world`), or group `group_id` of `groups`
    (`torchft`); `codistill.enabled: false` makes the whole world one group (the baseline)."""
    if separate_group_jobs(cd):
        return ParallelDims(world_size=world_size, groups=1, rank=rank, replicate=replicate, tp=tp,
                            first_group=cd.group_id, total_groups=cd.group_slots)
    return ParallelDims(world_size=world_size, groups=cd.groups if cd.enabled else 1, rank=rank,
                        replicate=replicate, tp=tp)


def lighthouse_url(cd: CodistillConfig) -> str:
    """`transport: torchft`: the Lighthouse from the config, else torchft's own variable."""
    return cd.lighthouse or os.environ["TORCHFT_LIGHTHOUSE"]


def check_lighthouse(cd: CodistillConfig) -> None:
    """On every rank before anything heavy starts: a Lighthouse address that is wrong or down
    fails within seconds with one line, not after the model is built."""
    if separate_group_jobs(cd):
        from codistill_ds.exchange.transport.contract import check_reachable
        from codistill_ds.exchange.transport.trust import load_secret

        load_secret(cd)  # an unreadable or short secret fails here, on every rank
        check_reachable(lighthouse_url(cd), LIGHTHOUSE_CONNECT_S)


def build_job_topology(cd: CodistillConfig, dims: ParallelDims, cuda: bool = False) -> Topology:
    """The process groups of `dims` (a collective over the whole world; once per job), with the
    cross-group groups on `codistill.exchange_backend`."""
    from codistill_ds.distributed import comm

    return build_topology(dims, comm.resolve_exchange_backend(cd.exchange_backend, cuda))


def group_seed(seed: int, cd: CodistillConfig, group_id: int) -> int:
    """The seed that builds group g's replica: its own initialization, unless `same_init`."""
    return seed + (0 if cd.same_init else group_id)


def build_transport(cd: CodistillConfig, topology: Topology, contract: Callable[[], dict] | None = None) -> Transport:
    """`world`: the routes over this job's process groups (`exchange_batch: train` sends each
    prediction to its owner). `torchft`: this group's Lighthouse membership with its exchange
    contract (`lighthouse_member`); every rank gets the transport (on route leaders the
    non-leaders gather and scatter through it)."""
    to_owners = cd.exchange_batch == "train"
    if not separate_group_jobs(cd):
        from codistill_ds.exchange.transport.world import LogitExchange

        transport = LogitExchange(topology, cd.route, to_owners=to_owners, reports=cd.peer_guard_ratio > 0)
    else:
        from codistill_ds.exchange.transport.ft import TorchFTTransport

        member = lighthouse_member(cd, topology, contract)
        rails = ft_rails(cd, topology, member) if cd.route == "rails" else None
        transport = TorchFTTransport(topology, member, cd.route, to_owners=to_owners, rails=rails)
    if topology.tp > 1:  # each TP rank sends a distinct 1/T of the rows: the T = 1 bytes
        from codistill_ds.exchange.transport.tp_rows import TensorParallelRows

        transport = TensorParallelRows(transport, topology.exchange_tp_group, topology.tp_rank, topology.tp)
    return transport


def lighthouse_member(cd: CodistillConfig, topology: Topology, contract: Callable[[], dict] | None):
    """`transport: torchft`: my group's Lighthouse membership, on its leader (None on the other
    ranks); `contract()` is evaluated there only."""
    if not topology.is_leader:
        return None
    from codistill_ds.exchange.transport.lighthouse import LighthouseMember
    from codistill_ds.exchange.transport.trust import load_secret

    if contract is None:
        raise ValueError("transport torchft needs the exchange contract of this group")
    return LighthouseMember(lighthouse_url(cd), cd.group_id, contract(), cd.exchange_timeout_s, key=load_secret(cd))


def ft_rails(cd: CodistillConfig, topology: Topology, member):
    """`transport: torchft`, route rails or weight exchange: rank r's process group over rail r
    of the groups in its leader's view of each round (`transport/rails.py`); every rank signs
    and checks its rail's frames with the shared secret (`trust.py`)."""
    from codistill_ds.exchange.transport.rails import FTRails
    from codistill_ds.exchange.transport.trust import load_secret

    return FTRails(topology, member, lighthouse_url(cd), cd.exchange_timeout_s, key=load_secret(cd),
                   to_owners=cd.mode == "logits" and cd.exchange_batch == "train")


def build_engine(cd: CodistillConfig, topology: Topology, transport: Transport,
                 batch_for: Callable[[int, int], ExchangeBatch], seed: int) -> ExchangeEngine:
    """The exchange engine of this rank: the only place one is constructed."""
    return ExchangeEngine(transport=transport, settings=ExchangeSettings.from_config(cd, seed),
                          group=topology.group, group_id=topology.group_id, batch_for=batch_for,
                          on_own_batch=cd.exchange_batch == "train", leader=topology.is_leader)


def join_groups(transport: Transport, cd: CodistillConfig, topology: Topology) -> int:
    """Groups in separate jobs wait (up to `codistill.join_timeout_s`) until all are present, so
    a fresh or resumed experiment's first exchange has every peer, and a group restarted while
    the others run is present as soon as they reach their next round. One job holding every
    group has them all at once. Returns how many groups are present; every rank calls it."""
    start = time.monotonic()
    present = transport.join(cd.groups, cd.join_timeout_s)
    took = time.monotonic() - start
    if separate_group_jobs(cd) and topology.rank == 0:
        member = getattr(transport, "member", None)
        retired = sorted(getattr(member, "retired", {}))
        note = f" ({', '.join(f'group {g}' for g in retired)} retired: not waited for)" if retired else ""
        if getattr(member, "missing", None):
            note += f" after {cd.join_timeout_s:.0f}s; starting without the others"
        log.info("group %d: %d of %d groups present%s (join took %.1fs)", cd.group_id, present, cd.groups, note,
                 took)
    return present
