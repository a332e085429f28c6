"""Rank program: test_tensor_parallel.py's four rank programs in one 4-rank launch.

Every launch pays its rank starts again (interpreter, torch, transformers and DeepSpeed imports,
process groups, warm-up), so these checks share one process per rank, one after the other:
  build  tp_memory_check.checks: peak resident memory of building the 88M Llama, TP and FSDP2
         through `build_parallel_replica` vs whole, first, while the process is fresh; here 2
         groups of S = 2 ranks, all four measuring (ZeRO-3's construction does not complete
         with group 1 idle: tried, it hangs) (the launcher sets MALLOC_MMAP_THRESHOLD_=65536)
  tp     tp_check.checks: TP + FSDP2/HSDP against the unsharded references, DCP, export, AC
  autotp autotp_check.checks: DeepSpeed AutoTP + ZeRO-1 with the groups' own process groups,
         and DeepSpeed's default grouping refused (last of the distributed checks: it leaves
         DeepSpeed's group globals behind)
  ac     ac_memory.measure: peak resident memory of one step under activation checkpointing,
         one mode per process as before: rank 0 "none", rank 1 "full", rank 2 "selective"
         (rank 3 none), at the same time, with no collective in flight
Args: OUT. Writes OUT/rank{r}.json = {"build": ..., "tp": ..., "autotp": ..., "ac": ... | null}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ac_memory
import autotp_check
import torch.distributed as dist
import tp_check
import tp_memory_check

from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown

AC_MODES = ("none", "full", "selective")


def main() -> None:
    out = Path(sys.argv[1])
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    rankinfo.skip_deepspeed_shm_op()
    rank = dist.get_rank()
    assert dist.get_world_size() == 4, "tp_check and autotp_check's meshes are 4 ranks"
    facts = {"rank": rank, "build": tp_memory_check.checks()}
    facts["tp"] = tp_check.checks(out)
    facts["autotp"] = autotp_check.checks()
    dist.barrier()
    facts["ac"] = ac_memory.measure(AC_MODES[rank]) if rank < len(AC_MODES) else None
    (out / f"rank{rank}.json").write_text(json.dumps(facts, indent=1))
    dist.barrier()
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
