"""Run an unmodified Trainer script with a probe attached: `python hf_probe.py [--local_rank=N] SCRIPT ARGS...`.

The probe is a `TrainerCallback` added to transformers' `DEFAULT_CALLBACKS`, so the script under
test stays exactly as written. It records, into $PROBE_OUT:
  init_rank{r}.pt   every parameter gathered inside its ZeRO-3 group (or as held) when the
                    Trainer is built, i.e. right after the script constructed / loaded the model
  final_group{g}.pt the same at the end of train(), on each group's leader
  logs_rank{r}.jsonl every log dict, appended as it happens (survives an os._exit)
  rank{r}.json      partitions of every parameter after the engine was built, data-parallel
                    size, group, output_dir, should_save, train rows
$PROBE_FAULT (comma-separated, like tests/workers/ckpt_run.py):
  nanlogits:G:S  group G's exchange predictions at step index S are NaN
  nanrank:R:S    rank R's exchange predictions at step index S are NaN (the rest of its group's
                 are finite)
  nanloss:G:S    group G's training loss at step index S is NaN (its weights then diverge)
"""

from __future__ import annotations

import json
import os
import runpy
import sys

import torch
import transformers
from transformers import TrainerCallback

OUT = os.environ["PROBE_OUT"]
RANK = int(os.environ.get("RANK", "0"))
TRAINERS: list = []


def faults() -> list[tuple[str, int, int]]:
    out = []
    for item in filter(None, os.environ.get("PROBE_FAULT", "").split(",")):
        kind, group, step = item.split(":")
        out.append((kind, int(group), int(step)))
    return out


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full: ZeRO-3 ones gathered over their own (group) process group,
    FSDP2 ones over their mesh."""
    params = dict(model.named_parameters())
    zero = [p for p in params.values() if hasattr(p, "ds_id")]
    if zero:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
            return {k: p.detach().clone().cpu() for k, p in params.items()}
    return {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu() for k, p in params.items()}


def partitions(trainer) -> dict:
    """Per parameter [local, full] under ZeRO-3; ZeRO-1/2: the optimizer's flat fp32 partitions."""
    engine = trainer.model_wrapped
    facts = {"dp_world_size": getattr(engine, "dp_world_size", None)}
    params = dict(trainer.model.named_parameters())
    if any(hasattr(p, "ds_numel") for p in params.values()):
        facts["parts"] = {k: [int(p.ds_tensor.numel()), int(p.ds_numel)] for k, p in params.items()}
    elif any(hasattr(p, "to_local") for p in params.values()):  # FSDP2 DTensors
        facts["parts"] = {k: [int(p.to_local().numel()), int(p.numel())] for k, p in params.items()}
        facts["dp_world_size"] = next(iter(params.values())).device_mesh.size()
    else:
        opt = engine.optimizer
        facts["flat_partitions"] = [int(t.numel()) for t in opt.single_partition_of_fp32_groups]
        facts["partition_count"] = list(opt.partition_count)
        facts["numel"] = sum(p.numel() for p in params.values())
    return facts


class Probe(TrainerCallback):
    def on_init_end(self, args, state, control, model=None, **kwargs):
        torch.save(gathered(model), os.path.join(OUT, f"init_rank{RANK}.pt"))

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = TRAINERS[-1]
        t = trainer.codistill.topology
        self.facts = {"rank": RANK, "group": t.group_id, "group_rank": t.position, "start_step": state.global_step,
                      "output_dir": args.output_dir, "should_save": args.should_save,
                      "train_rows": len(trainer.train_dataset), **partitions(trainer)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        with open(os.path.join(OUT, f"logs_rank{RANK}.jsonl"), "a") as f:
            f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = gathered(model)
        if self.facts["group_rank"] == 0:
            torch.save(weights, os.path.join(OUT, f"final_group{self.facts['group']}.pt"))
        with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
            json.dump(self.facts, f)


def install_faults(plan: list[tuple[str, int, int]]) -> None:
    """Patch the teacher output / the training loss of one group at one step (the inputs of the
    guards under test, as a diverging model would produce them)."""
    from codistill_ds.integrations.hf_trainer.callback import CodistillCallback
    from codistill_ds.integrations.hf_trainer.mixin import CodistillTrainerMixin

    predict, compute_loss = CodistillCallback._predict, CodistillTrainerMixin.compute_loss

    def nan_if(kind: str, trainer) -> bool:
        t = trainer.codistill.topology
        return (kind, t.group_id, trainer.state.global_step) in plan

    def faulty_predict(self, inputs):
        logits = predict(self, inputs)
        mine = ("nanrank", RANK, self.trainer.state.global_step) in plan
        return logits * float("nan") if nan_if("nanlogits", self.trainer) or mine else logits

    def faulty_loss(self, model, inputs, *args, **kwargs):
        out = compute_loss(self, model, inputs, *args, **kwargs)
        if model.training and nan_if("nanloss", self):
            return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")
        return out

    CodistillCallback._predict, CodistillTrainerMixin.compute_loss = faulty_predict, faulty_loss


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    transformers.trainer.DEFAULT_CALLBACKS.append(Probe())
    init = transformers.Trainer.__init__

    def keep(self, *args, **kwargs):
        TRAINERS.append(self)
        init(self, *args, **kwargs)

    transformers.Trainer.__init__ = keep
    install_faults(faults())
    argv = sys.argv[1:]
    script = next(a for a in argv if a.endswith(".py"))
    sys.argv = [script] + [a for a in argv if a != script]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
