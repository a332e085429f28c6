"""`codistill-ds retire RUN_DIR`: a group that runs as its own job (`transport: torchft`) leaves
for good, on purpose.

It writes RUN_DIR/RETIRE. The group's leader sees it after its current step, the whole group
stops after that step (a checkpoint is saved when `train.save_interval` is set) and its job
leaves the Lighthouse with a retire mark: the running groups stop exchanging with it at once,
do not block on the next quorum for it, and pass the mark on in their member data, so a group
that starts or restarts later does not wait for it at its join (`codistill.join_timeout_s`).
A job that ends normally (its `train.steps` done) leaves the same way. Killed or stopped jobs
leave no mark: they are failures, waited for at the next round up to the Lighthouse's timeouts.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_retire_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run dir of the group's job (its run_dir setting)")


def run_retire(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.run_dir, "config.yaml")):
        print(f"codistill-ds: error: {args.run_dir} is not a run dir (no config.yaml)", file=sys.stderr)
        return 2
    path = os.path.join(args.run_dir, "RETIRE")
    with open(path + ".tmp", "w") as fh:
        fh.write("retire requested\n")
    os.replace(path + ".tmp", path)
    print(f"codistill-ds retire: asked the job of {args.run_dir} to retire after its current step "
          f"({path}); it leaves the other groups with a retire mark", flush=True)
    return 0
