"""Rank program: peak resident memory of building one replica, sharded over S=2 ranks vs whole.

2 ranks, one group. The model (~88M parameters, fp32, ~350 MB) is large enough that its weights
dominate. Each build is measured as the rise of VmHWM (peak resident set) over the resident set
before it, the peak being reset through /proc/self/clear_refs; the launcher sets
MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to the system and one build cannot hide in
the pages of the previous one (the residue after each build is reported). Order: ZeRO-3,
FSDP2, then the whole model. Args: OUT. Writes OUT/rank{r}.json (bytes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from resident import measure

from codistill_ds.backends.fsdp import build_sharded
from codistill_ds.backends.materialize import build_zero3
from codistill_ds.backends.model import ModelRecipe, count_parameters
from codistill_ds.config import ModelConfig
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.distributed.topology import world_topology

BIG = ModelConfig(hidden_size=768, num_layers=8, num_heads=12, intermediate_size=3072, max_seq_len=128)
WARM = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=32)
VOCAB = 8192


def main() -> None:
    out = Path(sys.argv[1])
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    t = world_topology(1)
    mesh = t.shard_mesh("cpu")
    big, warm = ModelRecipe(BIG, VOCAB, 0.0, 5), ModelRecipe(WARM, VOCAB, 0.0, 5)

    def fsdp(recipe):
        return build_sharded(recipe, mesh, bf16=False, cpu_offload=False, reshard_after_forward=True,
                             device=torch.device("cpu"))

    for build in (warm.build, lambda: build_zero3(warm.build, t.group), lambda: fsdp(warm)):
        build()  # imports, allocator pools and gloo buffers, outside the measurements
    facts = {"rank": t.rank, "params": count_parameters(big.skeleton()),
             "zero3": measure(lambda: build_zero3(big.build, t.group)),
             "fsdp": measure(lambda: fsdp(big)),
             "whole": measure(big.build)}
    (out / f"rank{t.rank}.json").write_text(json.dumps(facts))
    dist.barrier()
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
