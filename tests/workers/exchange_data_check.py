"""Rank program: `check_same_exchange_data` on equal, then different datasets. Args: OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from codistill_ds.config import ConfigError
from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.distributed.env import exit_process, init_distributed, shutdown
from codistill_ds.integrations.exchange_data import check_same_exchange_data


def main() -> None:
    out = Path(sys.argv[1])
    init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ParallelDims(world_size=world, groups=world, rank=rank)
    rows = [{"input_ids": [i, i + 1]} for i in range(10)]
    check_same_exchange_data(rows, layout)  # equal everywhere: passes
    if rank == world - 1:
        rows[5] = {"input_ids": [0, 0]}  # the middle row differs on the last rank
    try:
        check_same_exchange_data(rows, layout)
        result = {"raised": None}
    except ConfigError as err:
        result = {"raised": str(err)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
