"""Failure handling: a dead rank, a diverged group, a poisoned peer, a silent peer.

Multi-rank runs start every rank as its own process (ckpt_runs.launch_ranks), not under a
launcher, because torchrun would kill the survivors itself: here they must notice on their own.
  - ZeRO-3, rank 1 SIGKILLed at step 6: every other rank exits non-zero within
    backend.peer_timeout_s, each with one line naming rank 1, group 0, its own last completed
    step and the last checkpoint; `--resume` then continues from step_4 and ends identical to
    the uninterrupted run (losses, exchanged predictions, weights).
  - FSDP2, 2 groups x 2 ranks, one rank of group 1 sends NaN predictions at step 3 (both
    ranks of group 0 skip group 1, counted in `skipped_peers`, though only one of them received
    the NaN), then group 1's loss turns NaN at step 6: group 1 stops with a clear error before
    its next exchange, group 0 stops quoting it.
Single-process: the watchdog turns a silent peer into an exit with a message.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ckpt_runs import (
    CONFIG,
    PEER_TIMEOUT_S,
    WORKER,
    assert_same_training,
    by_group_step,
    launch_ranks,
    overrides,
    run_torchrun,
    straight,
    wait_all,
)

from codistill_ds.run.watchdog import EXIT_NONFINITE, EXIT_PEER_LOST, is_comm_error
from launch import REPO, WORKERS, child_env


def error_lines(logs: Path, rank: int) -> list[str]:
    text = (logs / f"rank{rank}.err").read_text()
    return [ln[ln.index("codistill-ds: error:"):] for ln in text.splitlines() if "codistill-ds: error:" in ln]


@pytest.mark.timeout(900)
def test_killed_rank_stops_everyone_then_resume_loses_nothing(tmp_path):
    ref = straight("deepspeed")
    logs = tmp_path / "logs"
    procs = launch_ranks(4, [WORKER, str(tmp_path), CONFIG, *overrides(tmp_path / "run", "deepspeed")],
                         logs, FAULT="kill:1:5")
    exits = wait_all(procs, timeout=300)
    assert exits[1][0] == -9, exits  # the victim
    killed_at = exits[1][1]
    for r in (0, 2, 3):
        code, when = exits[r]
        assert code == EXIT_PEER_LOST, (r, code, (logs / f"rank{r}.err").read_text()[-3000:])
        print(f"rank {r} exited {when - killed_at:.2f}s after the kill")
        assert when - killed_at < PEER_TIMEOUT_S
        lines = error_lines(logs, r)
        assert len(lines) == 1, lines
        line = lines[0]
        assert f"rank {r} (group {r // 2})" in line and "rank 1 (group 0) exited" in line, line
        assert re.search(r"Last completed step: [5-8];", line), line
        assert "step_4" in line and "--resume" in line, line
    run = tmp_path / "run"
    assert [n for n in sorted((run / "checkpoints").iterdir())][-1].name == "step_4"
    # resume under torchrun: from step_4, the four lost steps again, nothing else changed
    res = run_torchrun(tmp_path, overrides(run, "deepspeed", "train.resume=auto"))
    assert all(r["start_step"] == 4 for r in res), res
    assert_same_training(ref, tmp_path, first_step=4)


@pytest.mark.timeout(600)
def test_nan_peer_is_skipped_and_diverged_group_stops(tmp_path):
    """2 groups x 2 ranks. At step index 2 only rank 3 (group 1, position 1) sends NaN
    predictions: under the leaders route they reach rank 1 alone, and rank 0 (group 0's
    leader, which writes the records) received finite ones. Both ranks of group 0 must still
    drop group 1 for that round (the finiteness is agreed over the group, issue 24): the
    leader's record counts the skipped peer and has nothing to distill at that step."""
    logs = tmp_path / "logs"
    # the peer guard on (transport world: the groups' reported losses travel in a 16-byte
    # all-gather over the rail, on the exchange's thread here): the healthy peer is never skipped
    sets = overrides(tmp_path / "run", "fsdp", "codistill.staleness=1", "train.save_interval=0",
                     "codistill.peer_guard_ratio=1.5")
    procs = launch_ranks(4, [str(WORKERS / "probe_run.py"), str(tmp_path), CONFIG, *sets], logs,
                         FAULT="nanloss:1:5", PROBE_FAULT="nanrank:3:2", PROBE_DIR=str(tmp_path))
    exits = wait_all(procs, timeout=300)
    codes = [c for c, _ in exits]
    assert codes == [EXIT_PEER_LOST, EXIT_PEER_LOST, EXIT_NONFINITE, EXIT_NONFINITE], codes
    for r in (2, 3):
        (line,) = error_lines(logs, r)
        assert f"rank {r} (group 1): training loss is not finite at step 6" in line, line
        assert "before sending predictions" in line, line
    for r in (0, 1):
        (line,) = error_lines(logs, r)
        assert f"rank {r} (group 0) stopping" in line, line
        assert "(group 1) reported: group 1 stopped: training loss is not finite at step 6" in line, line
    warn = (logs / "rank0.err").read_text()
    assert "group 0 skipped the predictions of peer group(s) [1] for exchange 2" in warn
    g0 = {s: rec for (g, s), rec in by_group_step(tmp_path / "run").items() if g == 0}
    assert g0[3]["skipped_peers"] == 0 and g0[4]["skipped_peers"] == 1, g0
    assert {k: v for k, v in g0[max(g0)]["skipped_reasons"].items() if v} == {"nan": 1}, g0
    assert g0[4]["distill_loss"] is None  # nothing to distil from at that step, on either rank
    assert g0[5]["distill_loss"] is not None  # the next exchange was finite again
    assert all(rec["loss"] is not None for rec in g0.values())  # group 0 was never poisoned
    g1 = {s for (g, s) in by_group_step(tmp_path / "run") if g == 1}
    assert max(g1) == 6  # logged its last step, then stopped


def test_watchdog_names_a_silent_peer(tmp_path):
    """A peer whose process lives on but stops answering (no heartbeat): my rank, blocked,
    exits by itself after peer_timeout_s with a message naming the peer."""
    script = textwrap.dedent(f"""
        import json, os, time
        from codistill_ds.run.watchdog import Watchdog
        from codistill_ds.distributed.topology import ParallelDims
        run = {str(tmp_path)!r}
        os.makedirs(os.path.join(run, "health"), exist_ok=True)
        json.dump({{"rank": 1, "group": 1, "step": 41, "time": time.time() - 60, "pid": os.getppid(),
                   "host": "elsewhere"}}, open(os.path.join(run, "health", "rank_1.json"), "w"))
        w = Watchdog(run, ParallelDims(world_size=2, groups=2, rank=0), peer_timeout_s=2, slow_timeout_s=60).start()
        w.completed(42)
        time.sleep(60)  # a collective that never returns
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), check=False,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == EXIT_PEER_LOST, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("codistill-ds: error:")]
    assert "rank 0 (group 0) stopping in step 43: no progress for 2s" in line, line
    assert "rank 1 (group 1) stopped answering" in line and "its last completed step: 41" in line, line
    assert "Last completed step: 42" in line, line
    assert elapsed < 30


def test_comm_errors_are_recognised():
    assert is_comm_error(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert not is_comm_error(ValueError("shape mismatch"))
    assert not is_comm_error(KeyError("lm_head.weight"))


def test_heartbeat_records_are_json(tmp_path):
    from codistill_ds.distributed.axes import ParallelDims
    from codistill_ds.run.watchdog import Watchdog

    w = Watchdog(str(tmp_path), ParallelDims(world_size=4, groups=2, rank=3), 5, 5).start()
    time.sleep(0.3)  # beats from completed steps are rate-limited
    w.completed(7)
    w.stop()
    beat = json.loads((tmp_path / "health" / "rank_3.json").read_text())
    assert beat["rank"] == 3 and beat["group"] == 1 and beat["step"] == 7
