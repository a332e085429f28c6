"""Rank and world helpers: the one module that reads RANK, WORLD_SIZE and friends.

torchrun, the deepspeed launcher and `accelerate launch` all export the same variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain `python` process has none of them and
runs as a world of one. Everything else in the library receives ranks and process groups as
arguments instead of looking them up.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist


def env_rank() -> int:
    """Global rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """World size from the launcher's environment, known before any collective exists.

    Config validation uses it so that a topology that cannot work is rejected before
    `init_process_group` could block waiting for peers."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    """Rank on this node; selects the GPU when there is one."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    """Times torchrun's elastic agent restarted the job (`--max-restarts`); 0 on the first attempt.

    A restarted job must continue from its last checkpoint, never start over (checkpoint.py)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def use_cuda() -> bool:
    """GPU path (NCCL) when CUDA is present, else CPU path (gloo)."""
    return torch.cuda.is_available()


def prepare_accelerator_env() -> None:
    """Point DeepSpeed at the CPU accelerator on machines without a GPU, at CUDA on GPU ones.

    Must run before `import deepspeed`: DeepSpeed picks its accelerator once, at import. An
    empty value (an old Makefile exported one) is replaced too: DeepSpeed rejects it."""
    if not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = "cuda" if use_cuda() else "cpu"


def skip_deepspeed_shm_op() -> None:
    """Call before DeepSpeed's first collective (after `prepare_accelerator_env`). Keeps DeepSpeed's CPU accelerator from building and starting its shared-memory all-reduce.

    On the CPU accelerator every DeepSpeed start JIT-compiles `deepspeed_shm_comm` (a C++ build
    under one file lock per extensions directory) and each local rank maps a 69 MB /dev/shm
    buffer that DeepSpeed 0.19 never unlinks (shm.cpp defines `shared_close`; nothing calls
    it): every 4-rank launch left 277 MB of RAM in /dev/shm, and after a day of test runs this
    machine OOM-killed a compiler. Training never uses the op (only `inference_all_reduce`
    does, which falls back to the process group's all-reduce without it). DeepSpeed keeps its
    op table as one dict meant to be edited (deepspeed/ops/__init__.py); marking the op
    incompatible makes `build_shm_op` return None. Nothing happens on GPU machines or where
    DeepSpeed is not installed."""
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def release_deepspeed_shm() -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer once every rank has mapped its peers'.

    Where the process group was created before the library could run `skip_deepspeed_shm_op`
    (TrainingArguments or an Accelerator start DeepSpeed's communication), DeepSpeed's CPU
    accelerator has already created `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`
    (69 MB, only when every rank is on one node: LOCAL_SIZE == world size) and would leave it
    behind after the job. Each rank maps every peer's buffer inside DeepSpeed's init, so after a
    barrier the names can go: the mappings stay valid until the processes exit, and the memory is
    returned then. Collective over the world when it acts; a no-op elsewhere (GPUs, torchrun's
    launches, no DeepSpeed), decided from the environment alone so every rank agrees."""
    if os.environ.get("DS_ACCELERATOR") != "cpu" or not dist.is_initialized():
        return
    world = dist.get_world_size()
    if os.environ.get("LOCAL_SIZE") != str(world):
        return
    from codistill_ds.distributed.comm import barrier

    barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())])
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def device() -> torch.device:
    """This rank's compute device."""
    if use_cuda():
        return torch.device("cuda", env_local_rank())
    return torch.device("cpu")


DEFAULT_BACKEND_GPU = "cpu:gloo,cuda:nccl"
"""The default group's backends on a GPU machine (see `init_distributed`)."""


def init_distributed(timeout_s: float = 600.0) -> None:
    """Create the default process group if the launcher asked for one.

    On a GPU machine it is "cpu:gloo,cuda:nccl": one group object with an NCCL backend for CUDA
    tensors (ZeRO/FSDP traffic, exchanged predictions) and a gloo backend for CPU tensors. The
    library's bookkeeping (loss and agreement sums, NaN flags, the start-up handshake) is a few
    numbers made on the CPU, and DeepSpeed, Accelerate and `new_group` calls without a backend
    inherit the default's backends; with plain "nccl" every such CPU tensor would fail ("no
    backend for cpu") or need a copy to the GPU at each call site. comm.py still moves tensors
    for groups that serve one device only. On CPU the group is gloo.

    A single process without launcher variables still gets a one-rank group so that the same
    code path (subgroups, collectives) runs everywhere; it listens on a free local port."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        from codistill_ds.distributed.launching import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    backend = DEFAULT_BACKEND_GPU if use_cuda() else "gloo"
    if use_cuda():
        torch.cuda.set_device(env_local_rank())
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, rank=env_rank(), world_size=env_world_size(),
                            timeout=timeout, store=_restart_store(timeout))


def _restart_store(timeout: datetime.timedelta):
    """After a torchrun restart, a fresh key space in the agent's store; None otherwise (env://).

    With static rendezvous the agent keeps one TCPStore across restarts and torch adds no
    per-attempt prefix, so restarted ranks would read the dead attempt's gloo addresses and
    fail with "Connection refused" (cf. pytorch/pytorch#135712)."""
    restarts = restart_count()
    if restarts == 0:
        return None
    store = launcher_store(timeout)
    return None if store is None else dist.PrefixStore(f"codistill/attempt_{restarts}", store)


def launcher_store(timeout: datetime.timedelta):
    """A client of the store torchrun's agent hosts (it outlives every rank), or None elsewhere."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env_world_size(),
                         is_master=False, timeout=timeout)


def wait_for_every_rank(what: str, max_wait_s: float) -> None:
    """Block until every rank has called this with the same `what`, or `max_wait_s` passed.

    For ranks about to exit on an error that every rank detects by itself (a bad config): the
    launcher kills the slower ranks as soon as the first exits, before they could say why.
    Under torchrun the agent's store counts arrivals; under other launchers there is no store
    that survives a rank, so a fixed grace stands in for it."""
    import time

    if env_world_size() <= 1:
        return
    try:
        store = launcher_store(datetime.timedelta(seconds=max_wait_s))
    except (RuntimeError, ValueError, KeyError):
        store = None
    if store is None:
        time.sleep(min(3.0, max_wait_s))
        return
    key = f"codistill/{what}/attempt_{restart_count()}"
    deadline = time.monotonic() + max_wait_s
    arrived = store.add(key, 1)
    while arrived < env_world_size() and time.monotonic() < deadline:
        time.sleep(0.05)
        arrived = store.add(key, 0)


def rank() -> int:
    """Global rank of this process (0 before initialization)."""
    return dist.get_rank() if dist.is_initialized() else env_rank()


def world_size() -> int:
    """Number of ranks in the job."""
    return dist.get_world_size() if dist.is_initialized() else env_world_size()


def is_main() -> bool:
    """Global rank 0: writes the progress bar and the final table."""
    return rank() == 0


def destroy() -> None:
    """Tear down every process group; for error paths, where a peer may be gone (no barrier)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """End a successful run: finish every collective still in flight, then tear down.

    A collective posted asynchronously and never waited for (a ZeRO-3 prefetch all-gather, an
    exchange on a background thread) can still be running on a gloo worker thread when the
    interpreter finalizes; that thread then frees tensors owned by Python objects, cannot take
    the GIL and aborts the process ("terminate called without an active exception", SIGABRT)
    after the run had succeeded. A barrier on a gloo group waits for all work queued on it
    before; groups are visited in creation order, the same on every rank, so no two ranks wait
    on each other in opposite orders."""
    if not dist.is_initialized():
        return
    from torch.distributed.distributed_c10d import _world

    from codistill_ds.distributed import comm

    for group in list(_world.pg_map):
        comm.barrier(group)
    dist.destroy_process_group()


_ON_EXIT: list[Callable[[], None]] = []


def on_exit(fn: Callable[[], None]) -> None:
    """Run `fn` when the process leaves through `exit_process` (which skips atexit handlers) or
    exits normally: for writers that must finish their files (dashboards)."""
    _ON_EXIT.append(fn)
    atexit.register(fn)


def exit_process(code: int) -> NoReturn:
    """Leave without interpreter finalization, after flushing what the user sees.

    Process groups that Python objects (DeepSpeed's engine, the topology) still reference are
    destroyed during finalization otherwise, and a library thread still alive then can abort a
    process whose run succeeded; only the `on_exit` functions run (files of ours are closed)."""
    for fn in reversed(_ON_EXIT):
        try:
            fn()
        except Exception as err:  # noqa: BLE001 -- a dashboard failing to close must not change the exit code
            print(f"codistill-ds: warning: at exit: {type(err).__name__}: {err}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


