"""Rank and world helpers: the one module that reads RANK, WORLD_SIZE and friends.

torchrun, the deepspeed launcher and `accelerate launch` all export the same variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain `python` process has none of them and
runs as a world of one. Everything else in the library receives ranks and process groups as
arguments instead of looking them up.
"""

from __future__ import annotations

import datetime
import os

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


def use_cuda() -> bool:
    """GPU path (NCCL) when CUDA is present, else CPU path (gloo)."""
    return torch.cuda.is_available()


def prepare_accelerator_env() -> None:
    """Point DeepSpeed at the CPU accelerator on machines without a GPU.

    Must run before `import deepspeed`: DeepSpeed picks its accelerator once, at import."""
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def device() -> torch.device:
    """This rank's compute device."""
    if use_cuda():
        return torch.device("cuda", env_local_rank())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> None:
    """Create the default process group (NCCL on GPU, gloo on CPU) if the launcher asked for one.

    A single process without launcher variables still gets a one-rank gloo group so that the
    same code path (subgroups, collectives) runs everywhere; it listens on a free local port."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    backend = "nccl" if use_cuda() else "gloo"
    if use_cuda():
        torch.cuda.set_device(env_local_rank())
    dist.init_process_group(
        backend=backend,
        rank=env_rank(),
        world_size=env_world_size(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


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
    """Tear down the default group so the process can exit without gloo warnings."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
