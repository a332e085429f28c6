"""One rank of the communication benchmark: several training runs in one launched job.

Started by `python -m benchmarks.comm` under `torchrun` (loopback, or two network namespaces as
two nodes) as ``-m benchmarks.comm.worker JOB.json``. For every arm of the job it loads the config the
way the CLI does (`load_config(config, overrides)`) and calls `codistill_ds.run.job.run`, the
function behind `codistill-ds train`, so the arms train with the product's own loop, exchange,
backend, metrics.jsonl and summary.json. Running the arms in one job pays the launch (imports,
rendezvous, ~30 s on a loaded 2-core machine) once instead of once per arm.

Around the product, and without changing it, the worker adds two instruments:

- a byte counter on the `torch.distributed` collectives (installed before DeepSpeed is imported,
  so DeepSpeed's captured all-gather / reduce-scatter functions are the counted ones). Each call
  is converted to the bytes this rank puts on the wire under the usual ring/star algorithms
  (all-reduce 2(n-1)/n x N, reduce-scatter (n-1)/n x N_in, all-gather (n-1) x N_in, broadcast
  and scatter: the root sends (n-1) x N, gather: non-roots send N) and filed by phase (inside
  `train_step`, on the exchange thread, elsewhere in the loop) and by scope ("cross": the
  process group spans more than one codistillation group of the arm's reference split);
- process and main-thread CPU time per step around `CodistillLoop.train_step`, through the
  loop's hooks (`phase_marks`, which also files the counter's phase). The step's wall time and its
  exchange-batch compute (eval forward and compression) come from metrics.jsonl, which the
  engine fills; no private method of the library is wrapped.

With `link_dir` set (two-node mode), global rank 0 asks the orchestrator to set the link rate
before each arm (a request file, then it waits for the acknowledgement) and every rank waits on a
barrier: the orchestrator changes `tc` and reads the veth byte counters between arms.

Each rank writes RUN_DIR/comm_rank{r}.json per arm: counters, probe timings, wall times.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from codistill_ds.distributed.launching import REPO

# ----------------------------------------------------------------------------- byte counter

_LOCK = threading.Lock()
_STATE = {"phase": "setup", "split": 1, "world": 1}
_COUNTS: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
_IN_STEP = threading.local()


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return 0


def _group_info(group) -> tuple[int, list[int]]:
    if group is None:
        group = dist.group.WORLD
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:  # noqa: BLE001 - a group this rank is not in: nothing is sent
        return 0, []
    return len(ranks), ranks


def _scope(ranks: list[int]) -> str:
    """'cross' when the group's members span more than one block of the arm's split."""
    per = max(1, _STATE["world"] // max(1, _STATE["split"]))
    return "cross" if len({r // per for r in ranks}) > 1 else "intra"


def _record(op: str, group, wire: float, tensor_bytes: int) -> None:
    n, ranks = _group_info(group)
    if n <= 1:
        return
    if threading.current_thread() is not threading.main_thread():
        phase = "exchange_thread"
    elif getattr(_IN_STEP, "on", False):
        phase = "step"
    else:
        phase = _STATE["phase"]
    key = f"{phase}|{_scope(ranks)}|{op}"
    with _LOCK:
        c = _COUNTS[key]
        c[0] += 1
        c[1] += tensor_bytes
        c[2] += wire


def _arg(args, kwargs, i, name, default=None):
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else default)


def _wire(op: str, args, kwargs) -> tuple[object, float, int]:
    """(group, wire bytes this rank sends, tensor bytes) of one collective call."""
    me = dist.get_rank()
    if op in ("all_reduce", "all_reduce_coalesced"):
        t, group = _arg(args, kwargs, 0, "tensor" if op == "all_reduce" else "tensors"), kwargs.get("group", _arg(args, kwargs, 2, "group"))
        n, _ = _group_info(group)
        b = _nbytes(t)
        return group, 2 * (n - 1) / max(n, 1) * b, b
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        inp, group = _arg(args, kwargs, 1, "input"), _arg(args, kwargs, 3, "group")
        n, _ = _group_info(group)
        b = _nbytes(inp)
        return group, (n - 1) / max(n, 1) * b, b
    if op == "reduce_scatter":
        out, group = _arg(args, kwargs, 0, "output"), _arg(args, kwargs, 3, "group")
        n, _ = _group_info(group)
        b = _nbytes(out)
        return group, (n - 1) * b, b * n
    if op in ("all_gather_into_tensor", "_all_gather_base"):
        inp, group = _arg(args, kwargs, 1, "input_tensor"), _arg(args, kwargs, 2, "group")
        n, _ = _group_info(group)
        b = _nbytes(inp)
        return group, (n - 1) * b, b
    if op == "all_gather":
        t, group = _arg(args, kwargs, 1, "tensor"), _arg(args, kwargs, 2, "group")
        n, _ = _group_info(group)
        b = _nbytes(t)
        return group, (n - 1) * b, b
    if op == "broadcast":
        t, src, group = _arg(args, kwargs, 0, "tensor"), _arg(args, kwargs, 1, "src"), _arg(args, kwargs, 2, "group")
        n, _ = _group_info(group)
        b = _nbytes(t)
        return group, (n - 1) * b if src == me else 0.0, b
    if op == "gather":
        t, dst, group = _arg(args, kwargs, 0, "tensor"), _arg(args, kwargs, 2, "dst", 0), _arg(args, kwargs, 3, "group")
        b = _nbytes(t)
        return group, 0.0 if dst == me else float(b), b
    if op == "scatter":
        t, lst, src, group = (_arg(args, kwargs, 0, "tensor"), _arg(args, kwargs, 1, "scatter_list"),
                              _arg(args, kwargs, 2, "src", 0), _arg(args, kwargs, 3, "group"))
        b = _nbytes(t)
        return group, float(_nbytes(lst) - b) if src == me and lst else 0.0, b
    if op == "reduce":
        t, group = _arg(args, kwargs, 0, "tensor"), _arg(args, kwargs, 3, "group")
        n, _ = _group_info(group)
        b = _nbytes(t)
        return group, (n - 1) / max(n, 1) * b, b
    return None, 0.0, 0


_ERRORS: dict[str, str] = {}


def _record_error(op: str, exc: Exception) -> None:
    """A call the counter could not read: kept (first error per op) in the arm's output."""
    _ERRORS.setdefault(op, repr(exc))


COUNTED_OPS = ("all_reduce", "all_reduce_coalesced", "reduce_scatter_tensor", "_reduce_scatter_base",
               "reduce_scatter", "all_gather_into_tensor", "_all_gather_base", "all_gather",
               "broadcast", "gather", "scatter", "reduce")


def install_counter() -> None:
    """Wrap the torch.distributed collectives; must run before DeepSpeed is imported."""
    for op in COUNTED_OPS:
        original = getattr(dist, op, None)
        if original is None or getattr(original, "_comm_counted", False):
            continue

        def wrapper(*args, __op=op, __orig=original, **kwargs):
            try:
                group, wire, tb = _wire(__op, args, kwargs)
                _record(__op, group, wire, tb)
            except Exception as exc:  # noqa: BLE001 - counting must never break training
                _record_error(__op, exc)
            return __orig(*args, **kwargs)

        wrapper._comm_counted = True
        wrapper.__name__ = original.__name__
        wrapper.__doc__ = original.__doc__
        setattr(dist, op, wrapper)


# ----------------------------------------------------------------------------- timing probe

_PROBE: dict = {"steps": {}}


def _new_step_entry() -> dict:
    return {}


def phase_marks():
    """A `LoopHooks` for the product's loop: the counter's phase, and per-step wall,
    process-CPU and main-thread-CPU times around each `train_step` with the step's own
    `exchange_ms` (no method of the library is replaced)."""
    from codistill_ds.run.loop import LoopHooks

    class PhaseMarks(LoopHooks):
        def on_run_start(self, loop, start_step):
            _STATE["phase"] = "loop"

        def on_step_start(self, loop, step):
            _PROBE["current"] = _new_step_entry()
            _IN_STEP.on = True
            self.t0, self.c0, self.m0 = time.perf_counter(), time.process_time(), time.thread_time()

        def on_step_end(self, loop, step, record):
            _IN_STEP.on = False
            entry = _PROBE["current"]
            entry["step_ms"] = (time.perf_counter() - self.t0) * 1e3
            entry["cpu_ms"] = (time.process_time() - self.c0) * 1e3
            entry["main_cpu_ms"] = (time.thread_time() - self.m0) * 1e3
            entry["exchange_ms"] = record.get("exchange_ms", 0.0)
            _PROBE["steps"][step] = entry

        def on_run_end(self, loop, state):
            _STATE["phase"] = "after"

    return PhaseMarks()


# ----------------------------------------------------------------------------- link sync


def _link_checkpoint(link_dir: Path, index: int, rate: str | None, timeout_s: float = 180) -> None:
    """Rank 0 asks the orchestrator for `rate` (and a counter reading); all ranks wait."""
    dist.barrier()
    if dist.get_rank() == 0:
        (link_dir / f"req_{index}.json").write_text(json.dumps({"index": index, "rate": rate}))
        ack = link_dir / f"ack_{index}"
        deadline = time.monotonic() + timeout_s
        while not ack.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no link acknowledgement {ack} within {timeout_s} s")
            time.sleep(0.05)
    dist.barrier()


# ----------------------------------------------------------------------------- main


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    os.chdir(REPO)
    install_counter()
    from codistill_ds.distributed import env as rankinfo

    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed(float(job.get("timeout_s", 600)))
    import deepspeed.utils.groups as ds_groups

    from codistill_ds.config import load_config
    from codistill_ds.run.job import run

    link_dir = Path(job["link_dir"]) if job.get("link_dir") else None
    world, me = dist.get_world_size(), dist.get_rank()
    for i, arm in enumerate(job["arms"]):
        if link_dir is not None:
            _link_checkpoint(link_dir, i, arm.get("link"))
        cfg = load_config(arm.get("config"), arm["overrides"] + [f"run_dir={arm['run_dir']}"])
        split = cfg.codistill.groups if cfg.codistill.enabled else int(arm.get("split", 2))
        _STATE.update(phase="setup", split=split, world=world)
        _COUNTS.clear()
        _ERRORS.clear()
        _PROBE["steps"] = {}
        ds_groups.mpu = None  # the previous arm's engine left its mpu there; start clean
        dist.barrier()
        t0 = time.time()
        run(cfg, hooks=[phase_marks()])
        t1 = time.time()
        out = {
            "arm": arm["name"], "rank": me, "world": world, "split": split,
            "start_unix": t0, "end_unix": t1,
            "counters": {k: {"calls": v[0], "tensor_bytes": v[1], "wire_bytes": v[2]}
                         for k, v in sorted(_COUNTS.items())},
            "probe": [dict(step=s, **v) for s, v in sorted(_PROBE["steps"].items())],
            "counter_errors": dict(_ERRORS),
        }
        Path(arm["run_dir"], f"comm_rank{me}.json").write_text(json.dumps(out))
        if me == 0:
            print(f"[comm] arm {arm['name']} done in {t1 - t0:.1f} s", flush=True)
    if link_dir is not None:
        _link_checkpoint(link_dir, len(job["arms"]), None)
    rankinfo.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
