"""A bad config stops every rank fast with one message naming the field (no hang, exit != 0).

Each case launches 2 real ranks under torchrun (one per group, so topology errors show; the
fewest processes that can disagree); validation runs before the process group is created, so
no rank can be left waiting in a collective."""

from __future__ import annotations

import time

import pytest

from launch import REPO, cli

pytestmark = pytest.mark.timeout(300)

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
NPROC = 2

CASES = {
    "non-dividing world": (["codistill.groups=3"], "codistill.groups", "not divisible"),
    "unknown loss": (["codistill.loss=hellinger"], "codistill.loss", "hellinger"),
    "topk over vocab": (["codistill.topk=300"], "codistill.topk", "300"),
    "missing data file": (["data.train_files=[/no/such/corpus.txt]"], "data.train_files", "/no/such/corpus.txt"),
    "one group with codistillation": (["codistill.groups=1"], "codistill.groups", "at least 2"),
}


MARK = "codistill-ds: error:"


def error_lines(stderr: str) -> list[str]:
    """Each rank's error line, also when two ranks wrote at the same moment and their lines ran
    together or broke across each other: split the text at every marker, not at newlines."""
    return [MARK + part.split("\n")[0] for part in stderr.split(MARK)[1:]]


def test_error_lines_survive_interleaving():
    msg = "config field 'codistill.groups': world size 2 is not divisible by codistill.groups=3"
    together = f"W1206 torchrun noise\n{MARK} {msg}{MARK} {msg}\n"
    assert error_lines(together) == [f"{MARK} {msg}"] * 2


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_config_fails_fast_on_every_rank(case, tmp_path):
    overrides, field, detail = CASES[case]
    sets = [a for o in overrides for a in ("--set", o)]
    start = time.monotonic()
    proc = cli(NPROC, "train", "--config", CONFIG, "--run-dir", str(tmp_path), *sets, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == NPROC, proc.stderr[-3000:]  # one line from each rank
    assert all(f"'{field}'" in ln and detail in ln for ln in lines), lines
    assert "codistill_ds/" not in proc.stderr  # no traceback from our code, only the message
    assert elapsed < 60, f"took {elapsed:.0f}s"
