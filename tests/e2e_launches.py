"""The launches of tests/dist/test_e2e_backends.py, as one background job (tests/background.py).

`python tests/e2e_launches.py OUT` runs them two at a time (on 2 cores one launch leaves a core
idle through its start-up and rendezvous) and writes each one's output under OUT/NAME and its
exit status and output tails to OUT/NAME.json; the tests read those. Niced, one group can be
starved while its peer waits at an exchange, so every run gets the patience a slow peer needs
(PATIENCE: no number changes while no round times out) and each launch an hour.

  A: `codistill-ds train` under torchrun, ZeRO-3, alpha = 0 (exchange runs, weighs nothing)
  F: the same with FSDP2
  R: one 2-rank launch of plain runs written without codistill_ds's loop (the references):
     per group, a DeepSpeed run (R/deepspeed) then an FSDP2 run (R/fsdp)
  C: as A with alpha = 1 over the rails route, on ZeRO-2 (the one launch of that stage)
  D: as A under the `deepspeed` launcher
  P: a 4-rank partition check of the sharded replica from inside, ZeRO-3 then FSDP2
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from multirun import run_args

from codistill_ds.distributed.launching import torchrun_argv
from launch import REPO, WORKERS, child_env, free_port, run_captured

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
STEPS = 40
PATIENCE = ["codistill.exchange_timeout_s=1800", "backend.peer_timeout_s=3600", "backend.timeout_s=3600"]
COMMON = [f"train.steps={STEPS}", f"train.eval_interval={STEPS // 2}", *PATIENCE]
LAUNCH_TIMEOUT_S = 3600
REFERENCES = {"deepspeed": ["backend.name=deepspeed"], "fsdp": ["backend.name=fsdp"]}
BACKENDS = ("deepspeed", "fsdp")
TRAIN = {"A": ["codistill.alpha=0"], "F": ["codistill.alpha=0", "backend.name=fsdp"],
         "C": ["codistill.alpha=1", "codistill.route=rails", "backend.ds_config=ds_configs/zero2.json"]}
"""The `codistill-ds train` launches under torchrun, by their overrides."""
NAMES = ("A", "R", "F", "C", "D", "P")
"""In the order they start."""


def train_argv(run_dir: Path, *overrides: str) -> list[str]:
    return ["-m", "codistill_ds.cli", "train", "--config", CONFIG, "--run-dir", str(run_dir),
            "--set", *COMMON, *overrides]


def command(name: str, out: Path) -> list[str]:
    """Launch NAME's command, built as it starts: its rendezvous port is free now, not only at
    the session's start."""
    if name == "D":
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        return [deepspeed, "--num_gpus", "4", "--master_port", str(free_port()), "--module",
                *train_argv(out / "D", "codistill.alpha=0")[1:]]
    if name == "R":
        return torchrun_argv(2, [str(WORKERS / "plain_reference.py"), str(out / "R"), CONFIG, "2", COMMON[0],
                                 *PATIENCE, *run_args(REFERENCES)])
    if name == "P":
        runs = {b: [f"backend.name={b}", f"run_dir={out / 'P' / b / 'run'}"] for b in BACKENDS}
        return torchrun_argv(4, [str(WORKERS / "partition_check.py"), str(out / "P"), CONFIG, "codistill.alpha=1",
                                 "codistill.same_init=true", "train.steps=3", *PATIENCE, *run_args(runs)])
    return torchrun_argv(4, train_argv(out / name, *TRAIN[name]))


def launch(name: str, out: Path) -> int:
    (out / name).mkdir(parents=True, exist_ok=True)
    try:
        proc = run_captured(command(name, out), LAUNCH_TIMEOUT_S, cwd=REPO, env=child_env())
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = -1, str(e.stdout or ""), f"timed out after {LAUNCH_TIMEOUT_S} s\n{e.stderr or ''}"
    (out / f"{name}.json").write_text(json.dumps({"rc": rc, "stdout": stdout[-4000:], "stderr": stderr[-8000:]}))
    return rc


def main() -> int:
    out = Path(sys.argv[1])
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda name: launch(name, out), NAMES))
    return max(map(abs, codes))


if __name__ == "__main__":
    sys.exit(main())
