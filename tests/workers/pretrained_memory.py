"""Rank program: peak resident memory of loading a saved ~88M-parameter Llama (fp32, ~353 MB)
sharded over S = 2 ranks, against loading it whole.

2 ranks, one group. Measured as tp_memory_check.py measures a build (VmHWM reset through
/proc/self/clear_refs, the rise over VmRSS before; the launcher sets MALLOC_MMAP_THRESHOLD_ so
freed tensors leave the resident set): `kept` is what stays while the result lives.
  fsdp   FSDP2 over both ranks (mesh (1, 1, 2, 1)), `build_parallel_replica(weights=Pretrained)`
  tp     FSDP2 + TP, TP over both ranks (mesh (1, 1, 1, 2))
  zero3  `pretrained.load_zero3` over both ranks
  whole  `pretrained.load_whole`: the whole model on one rank (the reference size)
Args: OUT FOLDER. Writes OUT/rank{r}.json (bytes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from resident import measure

from codistill_ds.backends.model import build_model, count_parameters
from codistill_ds.backends.pretrained import Pretrained, load_whole, load_zero3
from codistill_ds.backends.replica import build_parallel_replica, group_process_group
from codistill_ds.backends.sharding import data_parallel_mesh
from codistill_ds.config import ModelConfig
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown

NAMES = ("codistill", "replicate", "dp_shard", "tp")


def main() -> None:
    out, folder = Path(sys.argv[1]), sys.argv[2]
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    cfg = ModelConfig(name_or_path=folder)
    meshes = {name: torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=NAMES)
              for name, shape in (("tp", (1, 1, 1, 2)), ("fsdp", (1, 1, 2, 1)))}

    def build():
        return build_model(cfg, vocab, 0.0, 5)

    def parallel(name):
        mesh = meshes[name]
        tp = mesh["tp"] if name == "tp" else None
        return lambda: build_parallel_replica(build, tp_mesh=tp, dp_mesh=data_parallel_mesh(mesh),
                                              group=group_process_group(mesh), weights=Pretrained(folder))

    group = group_process_group(meshes["fsdp"])
    with torch.device("meta"):
        params = count_parameters(build())
    load_zero3(build, folder, group)  # imports, allocator pools and gloo buffers, outside the measurements
    facts = {"rank": dist.get_rank(), "params": params,
             "fsdp": measure(parallel("fsdp")), "tp": measure(parallel("tp")),
             "zero3": measure(lambda: load_zero3(build, folder, group)),
             "whole": measure(lambda: load_whole(build, folder))}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(facts))
    dist.barrier()
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
