"""Rank program: DeepSpeed AutoTP (ZeRO-1) inside codistillation groups.

4 ranks, meshes (K, R, D, T) = (2, 1, 1, 2) and (1, 1, 2, 2) built with `init_device_mesh`.
Each group g (seed SEED + g) builds its replica whole (ZeRO-1 replicates it) and hands it to
`autotp.initialize_autotp` with its own TP and data-parallel process groups; two steps of a
client AdamW with DeepSpeed's gradient clipping active. Data rank a reads rows [a*B, (a+1)*B)
of the group's batch (the T ranks of a data rank the same rows). Reference: the unsharded model
of the same seed on the group's whole batch, torch's clip. Recorded: per-step losses, the
logits after the two steps (AutoTP gathers them), the groups the engine uses. Then, on
(2, 1, 1, 2), the same initialization with DeepSpeed's default grouping (`install_groups=False`):
`check_engine_groups` must refuse it, naming the cross-group data-parallel ranks.
Args: OUT. Writes OUT/rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from codistill_ds.backends.autotp import (
    AutoTPGroupError,
    autotp_groups_from_mesh,
    clear_group_globals,
    initialize_autotp,
)
from codistill_ds.backends.model import build_model
from codistill_ds.config import ModelConfig
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, max_seq_len=64)
VOCAB, SEED, B, SEQ = 64, 5, 2, 16
LR, EPS, MAX_NORM = 1e-4, 1e-6, 0.5  # see tp_check.py for why lr and eps
NAMES = ("codistill", "replicate", "dp_shard", "tp")


def group_batch(g: int, step: int, A: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * g + step)
    return torch.randint(0, VOCAB, (A * B, SEQ + 1), generator=gen)


def probe() -> torch.Tensor:
    return torch.arange(2 * SEQ).view(2, SEQ) % VOCAB


def ds_config(A: int, T: int) -> dict:
    return {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "train_batch_size": B * A,
            "zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": T},
            "gradient_clipping": MAX_NORM, "steps_per_print": 10**9, "bf16": {"enabled": False}}


def reference(seed: int, g: int, A: int) -> dict:
    model = build_model(TINY, VOCAB, 0.0, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    losses, norms = [], []
    for step in range(2):
        tokens = group_batch(g, step, A)
        loss = F.cross_entropy(model(input_ids=tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].reshape(-1))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        losses.append(float(loss))
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=probe()).logits
    return {"loss": losses, "norm": norms, "logits": logits}


def run(shape: tuple) -> dict:
    _K, R, D, T = shape
    A = R * D
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=NAMES)
    g, r, d, t = mesh.get_coordinate()
    a = r * D + d
    tp_group, dp_group = autotp_groups_from_mesh(mesh)
    seed = SEED + g
    ref = reference(seed, g, A)
    clear_group_globals()
    model = build_model(TINY, VOCAB, 0.0, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    engine = initialize_autotp(model, opt, ds_config(A, T), tp_group=tp_group, dp_group=dp_group)
    from codistill_ds.backends.autotp import engine_groups

    res = {"shape": list(shape), "group": g, "data_rank": a, "tp_rank": t, "groups": engine_groups(engine),
           "ref_loss": ref["loss"], "ref_norm": ref["norm"], "loss": [], "norm": [],
           "dp_world_size": engine.dp_world_size}
    q = engine.module.model.layers[0].self_attn.q_proj
    res["q_local_shape"] = list(q.weight.shape)
    for step in range(2):
        tokens = group_batch(g, step, A)[a * B:(a + 1) * B]
        logits = engine(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        res["norm"].append(float(engine.get_global_grad_norm()))
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=dp_group)
        res["loss"].append(float(mean) / A)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe()).logits
    res["logits_shape"] = list(logits.shape)
    res["logits_diff"] = (logits.float() - ref["logits"]).abs().max().item()
    return res


def run_default_grouping(shape: tuple) -> dict:
    """The same start with DeepSpeed's own grouping: must be refused."""
    _K, R, D, T = shape
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=NAMES)
    g = mesh.get_coordinate()[0]
    tp_group, dp_group = autotp_groups_from_mesh(mesh)
    clear_group_globals()
    model = build_model(TINY, VOCAB, 0.0, SEED + g)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    try:
        initialize_autotp(model, opt, ds_config(R * D, T), tp_group=tp_group, dp_group=dp_group,
                          install_groups=False)
    except AutoTPGroupError as err:
        return {"shape": list(shape), "refused": True, "message": str(err)}
    return {"shape": list(shape), "refused": False, "message": ""}


def checks() -> dict:
    """Both meshes, then the default grouping (also run by tp_suite.py, after tp_check's checks)."""
    return {"rank": dist.get_rank(), "runs": [run((2, 1, 1, 2)), run((1, 1, 2, 2))],
            "default": run_default_grouping((2, 1, 1, 2))}


def main() -> None:
    out = Path(sys.argv[1])
    rankinfo.init_distributed()
    rankinfo.prepare_accelerator_env()
    rankinfo.skip_deepspeed_shm_op()
    facts = checks()
    (out / f"rank{facts['rank']}.json").write_text(json.dumps(facts, indent=1))
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
