"""Independent groups (`codistill.transport: torchft`): real jobs, a real Lighthouse, real kills.

Two launches:
  parity   transport world (one 4-rank job = 2 groups x 2, ZeRO-3) and transport torchft (two
           2-rank ZeRO-3 jobs) side by side on the same config, async exchange 1 step stale:
           the same losses, distillation losses, exchanged predictions and bytes.
  faults   three 1-rank jobs (FSDP2) paced by a file, and a timeline of failures driven from
           the metrics the groups write: SIGKILL group 1 (every process of its job), an
           incompatible job claiming group 1 while it is down (refused, naming the field),
           restart group 1 with --resume, a second job claiming group 2 (refused), SIGSTOP
           group 2 past the exchange timeout, SIGCONT. The survivors never exit and record
           `peers` 2 -> 1 -> 2; the restarted group starts from its own checkpoint.
Plus input errors that need no training: an unreachable Lighthouse, a group id out of range.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import REPO, WORKERS, child_env, free_port, read_jsonl

pytestmark = [pytest.mark.timeout(900), pytest.mark.quiet]  # the failure timeline races 1 s heartbeats

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
CKPT_RUN = str(WORKERS / "ckpt_run.py")
PROBE_RUN = str(WORKERS / "probe_run.py")


def lighthouse(**kw):
    from codistill_ds.commands.lighthouse import start_lighthouse

    return start_lighthouse(port=0, bind="127.0.0.1", **kw)


def start_job(nproc: int, out: Path, overrides: list[str], log: Path, cli: bool = False, probe: bool = False,
              **env: str) -> subprocess.Popen:
    """One group's job under torchrun: tests/workers/ckpt_run.py (records what it sent, received
    and restored), or the real `codistill-ds train` (`cli`: its exit code and error line).
    `probe`: tests/workers/probe_run.py instead (ckpt_run plus each due batch and distillation
    term rebuilt another way, the students checked by a forward of each batch alone)."""
    out.mkdir(parents=True, exist_ok=True)
    if probe:
        env = {"PROBE_DIR": str(out), "PROBE_FORWARD": "1", **env}
    if cli:  # a one-rank job needs no launcher; its exit code is the CLI's own
        cmd = [sys.executable, "-m", "codistill_ds.cli", "train", "--config", CONFIG, "--set", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), PROBE_RUN if probe else CKPT_RUN, str(out),
               CONFIG, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def signal_job(job: subprocess.Popen, sig: int) -> None:
    from codistill_ds.distributed.launching import signal_tree

    signal_tree(job, sig)


def records(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def wait_for(what: str, cond, timeout: float, jobs: dict | None = None, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for name, job in (jobs or {}).items():
            assert job.poll() is None, f"{name} exited ({job.returncode}) while waiting for {what}"
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def finish(job: subprocess.Popen, timeout: float) -> int:
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_job(job, signal.SIGKILL)
        raise


def log_tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


# ---- parity with transport world ----------------------------------------------------------------

PARITY = ["codistill.alpha=1", "codistill.staleness=1", "codistill.async_exchange=true", "train.steps=10"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    server, url = lighthouse(join_timeout_ms=30000)
    try:
        jobs = {"world": start_job(4, tmp / "world", [*PARITY, f"run_dir={tmp / 'world' / 'run'}"], tmp / "world.log")}
        for g in (0, 1):
            ft = ["codistill.transport=torchft", f"codistill.group_id={g}", f"codistill.lighthouse={url}",
                  f"run_dir={tmp / f'g{g}' / 'run'}"]
            jobs[f"g{g}"] = start_job(2, tmp / f"g{g}", [*PARITY, *ft], tmp / f"g{g}.log")
        for name, job in jobs.items():
            assert finish(job, 360) == 0, f"{name}:\n{log_tail(tmp / f'{name}.log')}"
    finally:
        server.shutdown()
    return tmp


def test_torchft_equals_world_transport(parity):
    world = {(r["group"], r["step"]): r for r in records(parity / "world" / "run")}
    ft = {(r["group"], r["step"]): r for g in (0, 1) for r in records(parity / f"g{g}" / "run")}
    assert world.keys() == ft.keys() and len(world) == 20
    for key in sorted(world):
        w, f = world[key], ft[key]
        assert abs(w["loss"] - f["loss"]) <= 1e-6, key
        assert (w["distill_loss"] is None) == (f["distill_loss"] is None), key
        if w["distill_loss"] is not None:
            assert abs(w["distill_loss"] - f["distill_loss"]) <= 1e-6, key
        assert w["cross_group_bytes"] == f["cross_group_bytes"], key
        assert w["peers"] == f["peers"], key
    assert all(world[(g, s)]["distill_loss"] > 0 for g in (0, 1) for s in range(3, 11))
    assert world[(0, 10)]["cross_group_bytes"] > 0
    # The predictions each rank sent and received, step by step, bit for bit.
    for g in (0, 1):
        for r in (0, 1):
            w = json.loads((parity / "world" / f"rank{g * 2 + r}.json").read_text())
            f = json.loads((parity / f"g{g}" / f"rank{r}.json").read_text())
            assert w["sent"] == f["sent"] and w["recv"] == f["recv"] and len(f["recv"]) == 10
            assert w["weights"] == f["weights"]


# ---- failures -------------------------------------------------------------------------------------

STOP_S = 8.0
EXCHANGE_TIMEOUT_S = 3.0


def fault_overrides(tmp: Path, g: int, url: str, *extra: str) -> list[str]:
    return ["backend.name=fsdp", "codistill.groups=3", "codistill.alpha=1", "train.steps=600",
            "train.save_interval=10", "train.keep_checkpoints=2", "train.eval_interval=0", "data.max_bytes=60000",
            "codistill.transport=torchft", f"codistill.group_id={g}", f"codistill.lighthouse={url}",
            f"codistill.exchange_timeout_s={EXCHANGE_TIMEOUT_S}", "codistill.join_timeout_s=120",
            "backend.peer_timeout_s=60", f"run_dir={tmp / f'g{g}' / 'run'}", *extra]


def peers_after(run_dir: Path, step: int, value: int) -> int | None:
    """First step after `step` whose record has peers == value."""
    return next((r["step"] for r in records(run_dir) if r["step"] > step and r.get("peers") == value), None)


def last_step(run_dir: Path) -> int:
    recs = records(run_dir)
    return recs[-1]["step"] if recs else 0


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The failure timeline; returns what happened, for the tests below to check."""
    tmp = tmp_path_factory.mktemp("faults")
    pace = tmp / "pace"
    pace.write_text("0.1")
    server, url = lighthouse(join_timeout_ms=1000, heartbeat_timeout_ms=1000)
    runs = {g: tmp / f"g{g}" / "run" for g in range(3)}
    jobs, facts = {}, {}
    try:
        for g in range(3):
            jobs[f"g{g}"] = start_job(1, tmp / f"g{g}", fault_overrides(tmp, g, url), tmp / f"g{g}.log",
                                      probe=True, PACE_FILE=str(pace))
        wait_for("all groups exchanging", lambda: all(peers_after(runs[g], 0, 2) for g in range(3)), 240, jobs)
        wait_for("a checkpoint of group 1", lambda: list((runs[1] / "checkpoints").glob("step_*/COMPLETE")), 60, jobs)
        # SIGKILL every process of group 1's job; keep a copy of the checkpoint it will resume from.
        signal_job(jobs["g1"], signal.SIGKILL)
        jobs.pop("g1").wait()
        newest = max((runs[1] / "checkpoints").glob("step_*/COMPLETE"), key=lambda p: int(p.parent.name[5:])).parent
        shutil.copytree(newest, tmp / "g1_snapshot" / "checkpoints" / newest.name)
        shutil.copy(runs[1] / "config.yaml", tmp / "g1_snapshot" / "config.yaml")
        killed_at, kill_step = time.monotonic(), {g: last_step(runs[g]) for g in (0, 2)}
        alone = wait_for("survivors alone", lambda: all(peers_after(runs[g], kill_step[g], 1) for g in (0, 2)), 60, jobs)
        facts["detect_s"] = time.monotonic() - killed_at
        facts["alone_steps"] = {g: peers_after(runs[g], kill_step[g], 1) for g in (0, 2)}
        # While group 1 is down, three jobs start at once: one with another exchange contract
        # claiming group 1 (refused, naming the field), a second job claiming the running group 2
        # (refused), and group 1 itself, resuming from its own checkpoint.
        resume_mark = {g: last_step(runs[g]) for g in (0, 2)}
        pace.write_text("0.5")  # three start-ups under way: the survivors must not run out of steps
        bad = start_job(1, tmp / "bad", fault_overrides(tmp, 1, url, "codistill.topk=4", f"run_dir={tmp / 'bad' / 'run'}"),
                        tmp / "bad.log", cli=True)
        dup = start_job(1, tmp / "dup", fault_overrides(tmp, 2, url, f"run_dir={tmp / 'dup' / 'run'}"),
                        tmp / "dup.log", cli=True)
        restarted = time.monotonic()
        jobs["g1"] = start_job(1, tmp / "g1", fault_overrides(tmp, 1, url, "train.resume=auto"), tmp / "g1b.log",
                               probe=True, PACE_FILE=str(pace))
        facts["bad_rc"], facts["dup_rc"] = finish(bad, 180), finish(dup, 180)
        facts["bad_log"], facts["dup_log"] = (tmp / "bad.log").read_text(), (tmp / "dup.log").read_text()
        wait_for("group 1 back", lambda: all(peers_after(runs[g], resume_mark[g], 2) for g in (0, 2)), 180, jobs)
        facts["rejoin_s"] = time.monotonic() - restarted
        facts["marks"] = {"kill": kill_step, "resume": resume_mark}
        pace.write_text("0.1")
        # SIGSTOP group 2 past the exchange timeout; the others keep training.
        before = {g: last_step(runs[g]) for g in (0, 1, 2)}
        signal_job(jobs["g2"], signal.SIGSTOP)
        time.sleep(STOP_S)
        during = {g: last_step(runs[g]) for g in (0, 1, 2)}
        signal_job(jobs["g2"], signal.SIGCONT)
        facts["stop"] = {"before": before, "during": during}
        cont_mark = {g: last_step(runs[g]) for g in (0, 1)}
        wait_for("group 2 back", lambda: all(peers_after(runs[g], cont_mark[g], 2) for g in (0, 1)), 90, jobs)
        # Let everyone run out, fast.
        pace.write_text("0")
        facts["rc"] = {}
        for name, job in jobs.items():
            facts["rc"][name] = finish(job, 360)
    finally:
        for job in jobs.values():
            if job.poll() is None:
                signal_job(job, signal.SIGKILL)
        server.shutdown()
    facts["runs"], facts["tmp"], facts["alone"] = runs, tmp, alone
    # The timeline's figures, for whoever reads a run (the closing notes quote them).
    keep = {k: facts[k] for k in ("detect_s", "rejoin_s", "alone_steps", "marks", "stop", "rc", "bad_rc", "dup_rc") if k in facts}
    (tmp / "facts.json").write_text(json.dumps(keep, indent=1, default=str))
    return facts


def test_survivors_keep_training_and_see_peers_go_and_come(faults):
    runs = faults["runs"]
    assert faults["rc"] == {"g0": 0, "g2": 0, "g1": 0}, {g: log_tail(faults["tmp"] / f"{g}.log") for g in faults["rc"]}
    marks = faults["marks"]
    for g in (0, 2):
        recs = records(runs[g])
        assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))  # no restart, no gap
        peers = {r["step"]: r["peers"] for r in recs}
        kill, resume, alone = marks["kill"][g], marks["resume"][g], faults["alone_steps"][g]
        assert 2 in [peers[s] for s in range(1, kill + 1)]  # all three exchanged before the kill
        # Group 1 gone: from the first round without it on, at most the other survivor (a round
        # can also miss it under load) until group 1 restarts. The step in flight when the kill
        # mark was read can still report a round formed before the kill (seen: step 11, mark 10).
        assert kill < alone <= resume
        assert max(peers[s] for s in range(alone, resume + 1)) <= 1
        assert 2 in [peers[s] for s in range(resume + 1, len(recs) + 1)]  # group 1 back
    # Lost within the Lighthouse heartbeat timeout (1 s) plus a round (join timeout 1 s), with slack
    # for a loaded machine.
    assert faults["detect_s"] < 15, faults["detect_s"]


def test_stopped_group_blocks_nobody_and_rejoins(faults):
    stop = faults["stop"]
    for g in (0, 1):  # kept training while group 2 was stopped (STOP_S > exchange timeout)
        assert stop["during"][g] > stop["before"][g] + 5, stop
    assert stop["during"][2] <= stop["before"][2] + 1, stop
    recs = records(faults["runs"][2])
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))


def test_a_group_held_back_is_distilled_on_its_own_batches(faults):
    """Issue 24, item 3: groups out of lockstep. Group 2, stopped for STOP_S, comes back steps
    behind and stays behind: every round then brings its predictions on an older exchange batch.
    The others distill on two target batches at once, theirs and group 2's, rebuilt locally:
      - those steps occur (several), with group 2's batch the older one for group 0 (group 1,
        restarted from its checkpoint earlier, is behind too);
      - a batch rebuilt for exchange e holds the tokens every group holds for e, including
        group 2 itself (one digest per exchange index across all three groups);
      - each student's rows, cut out of the one batched forward at their offsets, equal a
        forward of that batch alone, and each logged term equals the mean of each peer's
        divergence computed alone (every step of every group)."""
    probes = {g: json.loads((faults["tmp"] / f"g{g}" / "probe_rank0.json").read_text()) for g in range(3)}
    tokens: dict[int, set] = {}
    for probe in probes.values():
        for d in probe["due"]:
            tokens.setdefault(d["exchange"], set()).add(d["inputs"])
    assert all(len(v) == 1 for v in tokens.values()), {e: v for e, v in tokens.items() if len(v) > 1}
    for g in (0, 1):
        probe = probes[g]
        by_step: dict[int, list] = {}
        for d in probe["due"]:
            by_step.setdefault(d["step"], []).append(d)
        behind = {s: ds for s, ds in by_step.items() if len({d["exchange"] for d in ds}) > 1}
        # How many steps a held-back group stays behind depends on the machine's load (quiet: 5
        # and more; on 2 cores shared with a benchmark once 1): the checks below need one.
        assert len(behind) >= 1, (g, len(behind))
        for s, ds in behind.items():
            exchanges = [d["exchange"] for d in ds]
            assert len(set(exchanges)) == len(ds), ds  # one target batch per exchange index
            if s in exchanges:
                assert exchanges[0] == s, ds  # mine first
            if g == 0:  # never held back itself: every peer batch it sees is its own or older
                assert all(e <= s for e in exchanges), ds
        if g == 0:  # group 2, held back, sent predictions on older batches than group 0's
            assert sum(any(2 in d["peer_groups"] and d["exchange"] < s for d in ds) for s, ds in behind.items()) >= 1
        terms = {t["step"]: t for t in probe["terms"]}
        assert sum(terms[s]["batches"] > 1 for s in behind if s in terms) >= 1
        for term in probe["terms"]:
            assert term["got"] == pytest.approx(term["ref"], rel=1e-5, abs=1e-7), (g, term)
            assert term["forward_gap"] <= 1e-5, (g, term)
        print(f"\ngroup {g}: {len(behind)} steps distilled on two exchange batches at once; "
              f"largest student gap {max(t['forward_gap'] for t in probe['terms']):.1e}")


def test_restarted_group_resumes_from_its_own_checkpoint(faults, tmp_path):
    run = faults["tmp"] / "g1_snapshot"  # its newest checkpoint when it was killed
    facts = json.loads((faults["tmp"] / "g1" / "rank0.json").read_text())
    start = facts["start_step"]
    assert start >= 10 and start % 10 == 0
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "codistill_ds.cli", "export", str(run), "--group", "1", str(out),
                           "--step", str(start)], check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert facts["restored_weights"] == _digest(model)
    peers = [json.loads((faults["tmp"] / f"g{g}" / "rank0.json").read_text())["weights"] for g in (0, 2)]
    assert facts["restored_weights"] not in peers
    # It exchanged again soon after its start (process start-up dominates this figure).
    assert faults["rejoin_s"] < 120


def test_incompatible_and_duplicate_jobs_are_refused(faults):
    assert faults["bad_rc"] == 2, faults["bad_log"][-2000:]
    lines = [ln for ln in faults["bad_log"].splitlines() if "codistill-ds: error" in ln]
    assert lines and "codistill.topk" in lines[0] and "refused" in lines[0], faults["bad_log"][-2000:]
    assert faults["dup_rc"] == 2, faults["dup_log"][-2000:]
    lines = [ln for ln in faults["dup_log"].splitlines() if "codistill-ds: error" in ln]
    assert lines and "codistill.group_id" in lines[0] and "already trained by another job" in lines[0]


def _digest(model) -> str:
    def one(t: torch.Tensor) -> str:
        return hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]

    return hashlib.sha1(b"".join(one(p).encode() for p in model.parameters())).hexdigest()[:16]


# ---- input errors -----------------------------------------------------------------------------------

def test_unreachable_lighthouse_and_bad_group_id(tmp_path):
    port = free_port()
    base = [sys.executable, "-m", "codistill_ds.cli", "train", "--config", CONFIG, "--set", "codistill.transport=torchft",
            f"codistill.lighthouse=http://127.0.0.1:{port}"]
    start = time.monotonic()
    proc = subprocess.run([*base, "codistill.group_id=0", f"run_dir={tmp_path / 'a'}"], check=False, cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "codistill-ds: error" in ln]
    assert len(errors) == 1 and "codistill.lighthouse" in errors[0] and "cannot reach" in errors[0], proc.stderr[-3000:]
    assert took < 90, took  # the 10 s connect timeout plus interpreter and model start-up
    proc = subprocess.run([*base, "codistill.group_id=2", f"run_dir={tmp_path / 'b'}"], check=False, cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "codistill.group_id" in proc.stderr and "0..1" in proc.stderr, proc.stderr[-2000:]
