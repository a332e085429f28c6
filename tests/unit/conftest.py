"""Fixtures shared by the single-process tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from codistill_ds.distributed.launching import free_port


@pytest.fixture(scope="module")
def one_rank_world():
    """A gloo world of one rank for code that calls group collectives (the engine's NaN and
    agreement all-reduces, the peer guard): with one rank they run for real and return the
    local value. Reuses a world a test module already started."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
