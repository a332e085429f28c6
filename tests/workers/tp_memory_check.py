"""Rank program: peak resident memory of `build_parallel_replica` (TP / FSDP2) vs a whole build.

2 ranks, one group (or W ranks, W/2 groups of 2), the ~88M-parameter fp32 Llama of memory_check.py (~350 MB). Measured the
same way (VmHWM reset through /proc/self/clear_refs; the launcher sets MALLOC_MMAP_THRESHOLD_):
  tp     mesh (K, 1, 1, 2): TP over the group's 2 ranks (the ZeRO-3 partitions are 1/2, the TP shards 1/2)
  fsdp   mesh (K, 1, 2, 1): FSDP2 over the group's 2 ranks through the same route
  whole  `model.build_model` unsharded
Args: OUT. Writes OUT/rank{r}.json (bytes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from resident import measure

from codistill_ds.backends.model import build_model, count_parameters
from codistill_ds.backends.replica import build_parallel_replica, group_process_group
from codistill_ds.backends.sharding import data_parallel_mesh
from codistill_ds.config import ModelConfig
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown

BIG = ModelConfig(hidden_size=768, num_layers=8, num_heads=12, intermediate_size=3072, max_seq_len=128)
WARM = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=32)
VOCAB = 8192
NAMES = ("codistill", "replicate", "dp_shard", "tp")


def checks() -> dict:
    """The three measurements on the world already started (an even number W of ranks: W/2
    groups of S = 2; also run by tp_suite.py, first, in a fresh process)."""
    K = dist.get_world_size() // 2
    meshes = {name: torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=NAMES)
              for name, shape in (("tp", (K, 1, 1, 2)), ("fsdp", (K, 1, 2, 1)))}

    def parallel(cfg, name):
        mesh = meshes[name]
        return lambda: build_parallel_replica(lambda: build_model(cfg, VOCAB, 0.0, 5), tp_mesh=mesh["tp"],
                                              dp_mesh=data_parallel_mesh(mesh), group=group_process_group(mesh))

    for build in (lambda: build_model(WARM, VOCAB, 0.0, 5), parallel(WARM, "tp"), parallel(WARM, "fsdp")):
        build()  # imports, allocator pools and gloo buffers, outside the measurements
    with torch.device("meta"):
        params = count_parameters(build_model(BIG, VOCAB, 0.0, 5))
    facts = {"rank": dist.get_rank(), "params": params, "tp": measure(parallel(BIG, "tp")),
             "fsdp": measure(parallel(BIG, "fsdp")), "whole": measure(lambda: build_model(BIG, VOCAB, 0.0, 5))}
    dist.barrier()
    return facts


def main() -> None:
    out = Path(sys.argv[1])
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    facts = checks()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(facts))
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
