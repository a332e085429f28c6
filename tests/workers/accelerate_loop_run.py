"""Rank program: examples/accelerate_loop.py itself (under `accelerate launch`, or one plain
process), plus a record of what it trained. Args: OUT ARGS... (the example's arguments). Writes
OUT/rank{r}.json: the example's log records and, after training, each parameter's partition
(ZeRO-3) or flat optimizer partition (ZeRO-1/2) and a checksum of the full weights gathered
inside the group; a plain run records its logs and checksum only. Plain runs may be chained in
one process, `OUT ARGS... @NAME ARGS... @NAME ARGS...` (tests/workers/runs.py; the references of
both groups, one interpreter start): each builds its own Accelerator, seed, model and loader,
as a fresh process would, and writes under OUT/NAME."""

from __future__ import annotations

import importlib.util
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from partition_check import deepspeed_view

from runs import split_runs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("accelerate_loop_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    runs = split_runs(Path(sys.argv[1]), sys.argv[2:])
    assert len(runs) == 1 or all("--plain" in r for _, r in runs), "only plain runs chain in one process"
    for out, args in runs:
        if len(runs) > 1:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        record(out, args)
    # Ends as `codistill-ds train` does (env.exit_process: no interpreter finalization). Seen
    # once under load: a torchft job of this worker trained every step, wrote its results, then
    # aborted at finalization ("terminate called without an active exception"); the numbers
    # this worker reports were complete. The library's part of that: LighthouseMember.close
    # now joins its heartbeat thread.
    from codistill_ds.distributed.env import exit_process

    exit_process(0)


def record(out: Path, argv: list[str]) -> None:
    accelerator, model, logs, codistill = load_example().main(argv)
    from codistill_ds.backends.activation_checkpointing import checkpointed_layers

    result = {"rank": accelerator.process_index, "logs": logs,
              "checkpointed": checkpointed_layers(accelerator.unwrap_model(model))}
    if codistill is None:
        gathered, full = nullcontext, lambda: list(model.parameters())
    else:
        t = codistill.topology
        parts, gathered, full = deepspeed_view(model)
        result.update(group=t.group_id, group_rank=t.position, S=t.group_size, parts=parts,
                      dp_world_size=model.dp_world_size)
    with gathered():
        result["checksum"] = float(sum(p.detach().double().sum() for p in full()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
