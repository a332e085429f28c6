"""Elastic groups over `transport: torchft`: real jobs, a real Lighthouse, a retire on purpose.

One timeline of three one-rank jobs (FSDP2), paced by a file, driven from the metrics they write:
  1. groups 0 and 1 start (codistill.groups 2, max_groups 3) and exchange (peers 1);
  2. group 2 (an id >= groups, < max_groups) starts while they run, joins and exchanges: every
     group's peers rise to 2;
  3. `codistill-ds retire` on group 1: it stops after a step and leaves with a retire mark; the
     others leave it out at once and do not block on the quorum the Lighthouse holds for it
     (their steps stay far below its heartbeat timeout);
  4. group 0 is killed: group 2, alone, skips its teacher forward (`peers` 0 and
     `exchange_compute_ms` 0 from its second round alone on);
  5. group 0 restarts with --resume and expects groups 0..1: its join does not wait for the
     retired group 1 (the join time is measured against `join_timeout_s`);
  6. both remaining groups retire on request and exit 0.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, WORKERS, child_env, free_port, read_jsonl

pytestmark = pytest.mark.timeout(900)

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
HEARTBEAT_S = 4.0
JOIN_TIMEOUT_S = 60.0


def overrides(tmp: Path, g: int, url: str, groups: int = 2, *extra: str) -> list[str]:
    return ["backend.name=fsdp", f"codistill.groups={groups}", "codistill.max_groups=3", "codistill.alpha=1",
            "train.steps=5000", "train.save_interval=10", "train.keep_checkpoints=2", "train.eval_interval=0",
            "data.max_bytes=60000", "codistill.transport=torchft", f"codistill.group_id={g}",
            f"codistill.lighthouse={url}", "codistill.exchange_timeout_s=10",
            f"codistill.join_timeout_s={JOIN_TIMEOUT_S}", "backend.peer_timeout_s=90", f"run_dir={tmp / f'g{g}'}",
            *extra]


def start(tmp: Path, g: int, args: list[str], log: str, pace: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKERS / "ckpt_run.py"), str(tmp / f"out{g}"), CONFIG, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(PACE_FILE=str(pace)), stdout=(tmp / log).open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill(job: subprocess.Popen) -> None:
    from codistill_ds.distributed.launching import signal_tree

    signal_tree(job, signal.SIGKILL)
    job.wait()


def recs(tmp: Path, g: int) -> list[dict]:
    return read_jsonl(tmp / f"g{g}" / "metrics.jsonl")


def wait_for(what: str, cond, timeout: float, jobs: dict):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for name, job in jobs.items():
            assert job.poll() is None, f"{name} exited ({job.returncode}) while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def since(tmp: Path, g: int, wall: float) -> list[dict]:
    """Records of group g written after `wall` (its own `wall_s` clock: seconds since its start)."""
    return [r for r in recs(tmp, g) if r["wall_s"] > wall]


@pytest.fixture(scope="module")
def timeline(tmp_path_factory):
    from codistill_ds.commands.lighthouse import start_lighthouse

    tmp = tmp_path_factory.mktemp("elastic")
    pace = tmp / "pace"
    pace.write_text("0.1")
    server, url = start_lighthouse(port=0, bind="127.0.0.1", join_timeout_ms=int(1.5 * HEARTBEAT_S * 1000),
                                   heartbeat_timeout_ms=int(HEARTBEAT_S * 1000))
    jobs: dict[str, subprocess.Popen] = {}
    facts: dict = {}

    def last(g: int) -> dict:
        r = recs(tmp, g)
        return r[-1] if r else {"step": 0, "wall_s": 0.0}

    def retire(g: int) -> None:
        out = subprocess.run([sys.executable, "-m", "codistill_ds.cli", "retire", str(tmp / f"g{g}")], cwd=REPO,
                             env=child_env(), capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr

    try:
        for g in (0, 1):
            jobs[f"g{g}"] = start(tmp, g, overrides(tmp, g, url), f"g{g}.log", pace)
        wait_for("groups 0 and 1 exchanging", lambda: all(any(r["peers"] == 1 for r in recs(tmp, g)) for g in (0, 1)),
                 300, jobs)
        pace.write_text("0.4")  # a start-up under way: do not run out of steps
        jobs["g2"] = start(tmp, 2, overrides(tmp, 2, url, 3), "g2.log", pace)
        wait_for("peers 2 everywhere", lambda: all(any(r["peers"] == 2 for r in recs(tmp, g)) for g in (0, 1, 2)),
                 300, jobs)
        pace.write_text("0.1")
        facts["peers2"] = {g: next(r["step"] for r in recs(tmp, g) if r["peers"] == 2) for g in (0, 1, 2)}
        # Group 1 retires on purpose.
        retire(1)
        facts["g1_rc"] = jobs.pop("g1").wait(timeout=120)
        facts["retired_at"] = {g: last(g)["wall_s"] for g in (0, 2)}
        def settled(g: int) -> bool:
            rs = since(tmp, g, facts["retired_at"][g])
            return sum(r["peers"] == 1 for r in rs) >= 5 and rs[-1]["wall_s"] > facts["retired_at"][g] + 2 * HEARTBEAT_S

        wait_for("0 and 2 exchanging past the retired job's heartbeat timeout", lambda: all(settled(g) for g in (0, 2)),
                 240, jobs)
        facts["after_retire"] = {g: since(tmp, g, facts["retired_at"][g]) for g in (0, 2)}
        # Group 0 is killed: group 2 trains alone; then 0 restarts and joins without waiting for 1.
        wait_for("a checkpoint of group 0", lambda: list((tmp / "g0" / "checkpoints").glob("step_*/COMPLETE")), 120, jobs)
        kill(jobs.pop("g0"))
        killed = last(2)["wall_s"]
        wait_for("group 2 alone", lambda: sum(r["peers"] == 0 for r in since(tmp, 2, killed)) >= 5, 120, jobs)
        pace.write_text("0.4")
        jobs["g0"] = start(tmp, 0, overrides(tmp, 0, url, 2, "train.resume=auto"), "g0b.log", pace)
        wait_for("group 0 back", lambda: any(r["peers"] == 1 for r in since(tmp, 2, killed + 5)), 300, jobs)
        pace.write_text("0.1")
        facts["alone"] = [r for r in since(tmp, 2, killed) if r["peers"] == 0]
        joined = re.search(r"group 0: (\d+) of 2 groups present(.*)\(join took ([\d.]+)s\)", (tmp / "g0b.log").read_text())
        assert joined, (tmp / "g0b.log").read_text()[-3000:]
        facts["rejoin"] = {"present": int(joined.group(1)), "note": joined.group(2), "join_s": float(joined.group(3))}
        for g in (0, 2):
            retire(g)
        facts["rc"] = {name: job.wait(timeout=180) for name, job in jobs.items()}
    finally:
        for job in jobs.values():
            if job.poll() is None:
                kill(job)
        server.shutdown()
    facts["g1_log"] = (tmp / "g1.log").read_text()
    keep = {k: v for k, v in facts.items() if k in ("peers2", "g1_rc", "rejoin", "rc")}
    keep["max_step_ms_after_retire"] = {g: max(r["step_ms"] for r in rs) for g, rs in facts["after_retire"].items()}
    (tmp / "facts.json").write_text(json.dumps(keep, indent=1))
    print("elastic timeline:", json.dumps(keep))
    return facts


def test_a_group_joins_the_running_ones_and_exchanges(timeline):
    assert set(timeline["peers2"]) == {0, 1, 2}  # groups 0 and 1 (groups=2) took in group 2


def test_a_retired_group_is_left_out_and_not_waited_for(timeline):
    assert timeline["g1_rc"] == 0
    assert "retiring after step" in timeline["g1_log"]
    for rs in timeline["after_retire"].values():
        assert all(r["peers"] <= 1 for r in rs), [(r["step"], r["peers"]) for r in rs]
        assert sum(r["peers"] == 1 for r in rs) >= 5
        # The Lighthouse holds the quorum after a retirement until the retired job's heartbeat
        # times out (HEARTBEAT_S); a group that waited for it would show a step that long.
        assert max(r["step_ms"] for r in rs) < 1000 * HEARTBEAT_S / 2, [(r["step"], r["step_ms"]) for r in rs]


def test_alone_no_teacher_forward(timeline):
    alone = timeline["alone"]
    assert len(alone) >= 5
    # The first round without peers is found out by running it (the dead group was still in its
    # quorum); from then on the engine asks first and computes nothing.
    assert all((r["exchange_compute_ms"] or 0.0) == 0.0 for r in alone[1:]), [r["exchange_compute_ms"] for r in alone]


def test_restarted_group_does_not_wait_for_the_retired_one(timeline):
    rejoin = timeline["rejoin"]
    assert rejoin["present"] == 2 and "group 1 retired" in rejoin["note"], rejoin
    assert rejoin["join_s"] < JOIN_TIMEOUT_S / 4, rejoin
    assert timeline["rc"] == {"g2": 0, "g0": 0}
