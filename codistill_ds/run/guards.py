"""A group whose training loss is NaN/Inf stops before its next exchange.

A diverged group must not send predictions from its diverged weights to the peers:
`check_finite_loss` runs after every optimizer step and before the next exchange, agreed over
the group so all of its ranks stop together (the CLI job, the Trainer and the own loop call it).
Peers' predictions that are not finite are the exchange engine's concern (dropped per round,
counted as `skipped_peers`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from codistill_ds.distributed import comm


class NonFiniteLoss(RuntimeError):
    """My group's training loss is NaN/Inf: stop before sending predictions to the peers."""


def check_finite_loss(loss: float, group: dist.ProcessGroup, step: int, flag: bool = False) -> bool:
    """Raise `NonFiniteLoss` on every rank of my group when any of them saw a NaN/Inf loss.

    Runs after the optimizer step and before the next exchange: the diverged weights never
    produce predictions for the peers. Agreed over the group so all of its ranks stop together.
    `flag` rides on the same all-reduce (no extra collective): returns whether any rank of my
    group raised it (the CLI job's retire request, seen by the leader only)."""
    flags = torch.tensor([0.0 if math.isfinite(loss) else 1.0, float(flag)], dtype=torch.float64)
    comm.all_reduce(flags, op=comm.ReduceOp.MAX, group=group)
    if flags[0].item() > 0:
        raise NonFiniteLoss(
            f"training loss is not finite at step {step} (this rank's loss: {loss}); stopped "
            "before sending predictions to the peer groups. Lower optim.lr, raise "
            "optim.warmup_steps or check the data, then resume from the last checkpoint")
    return bool(flags[1].item() > 0)
