"""Rank program: a plain single-group DeepSpeed run (no mpu, no codistillation code) that trains
what group g of a codistillation job trains: same seed, same data shard, same schedules.
Args: OUT CONFIG GROUPS [--set ...]. Writes per-step losses for each group g in turn."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore")

import deepspeed  # noqa: E402

from codistill_ds.backends.base import decay_param_groups  # noqa: E402
from codistill_ds.backends.deepspeed_backend import build_ds_config  # noqa: E402
from codistill_ds.config import load_config  # noqa: E402
from codistill_ds.data import TrainStream, build_corpus  # noqa: E402
from codistill_ds.model import build_model  # noqa: E402
from codistill_ds.schedules import lr_at  # noqa: E402


def train_group(cfg, corpus, g: int, groups: int) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg.model, corpus.vocab_size, cfg.optim.dropout, cfg.seed + g)
    opt = torch.optim.AdamW(decay_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                             config=build_ds_config(cfg, world, False))
    stream = TrainStream(corpus, cfg.seed, g, groups, rank, world, cfg.data.micro_batch_size,
                         cfg.train.grad_accum)
    o, losses = cfg.optim, []
    for step in range(cfg.train.steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step, o.lr, o.warmup_steps, cfg.train.steps, o.schedule, o.min_lr)
        total = 0.0
        for m in range(cfg.train.grad_accum):
            batch = stream.micro_batch(step, m)
            logits = engine(input_ids=batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
            total += loss.item()
        t = torch.tensor([total / cfg.train.grad_accum], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


def main() -> None:
    out, config, groups = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = load_config(config, sys.argv[4:])
    deepspeed.init_distributed(dist_backend="gloo")
    corpus = build_corpus(cfg.data)
    result = {str(g): train_group(cfg, corpus, g, groups) for g in range(groups)}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
