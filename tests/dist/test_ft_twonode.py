"""Independent groups on two simulated nodes: the link between them goes down for 15 s.

Two network namespaces joined by a veth pair (benchmarks/comm/netns.py, as in the communication
benchmark); the Lighthouse and group 0 in node 0, group 1 in node 1, one rank each. With the
link down, group 1 cannot reach the Lighthouse (its rounds are skipped at once) and group 0
stops hearing group 1 (dropped after the heartbeat timeout): both train on alone, `peers` 0.
When the link comes back they exchange again, and both run to their last step. Needs root (for
`ip netns`); skipped elsewhere with the reason.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, WORKERS, child_env, read_jsonl

pytestmark = pytest.mark.timeout(420)

DOWN_S = 15.0
PORT = 29555  # inside node 0's own namespace: no other process can hold it


def records(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")


def wait_for(what: str, cond, timeout: float, procs: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for p in procs:
            assert p.poll() is None, f"a process exited ({p.returncode}) while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_link_down_both_groups_train_alone_then_exchange_again(tmp_path):
    from benchmarks.comm.netns import ADDRS, TwoNodes, netns_available

    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    pace = tmp_path / "pace"
    pace.write_text("0.1")
    url = f"http://{ADDRS[0]}:{PORT}"
    runs = [tmp_path / f"g{g}" / "run" for g in (0, 1)]
    procs: list[subprocess.Popen] = []
    with TwoNodes("1gbit") as nodes:
        try:
            lighthouse = [sys.executable, "-m", "codistill_ds.cli", "lighthouse", "--bind", ADDRS[0], "--port",
                          str(PORT), "--heartbeat-timeout-ms", "1000", "--join-timeout-ms", "1000"]
            procs.append(subprocess.Popen(nodes.command(0, lighthouse), cwd=REPO, env=child_env(),
                                          stdout=(tmp_path / "lighthouse.log").open("w"), stderr=subprocess.STDOUT))
            for g in (0, 1):
                sets = ["backend.name=fsdp", "codistill.alpha=1", "train.steps=800", "train.eval_interval=0",
                        "codistill.transport=torchft", f"codistill.group_id={g}", f"codistill.lighthouse={url}",
                        "codistill.exchange_timeout_s=3", "backend.peer_timeout_s=60", f"run_dir={runs[g]}"]
                argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                        "127.0.0.1", "--master_port", "29600", str(WORKERS / "ckpt_run.py"), str(tmp_path / f"g{g}"),
                        str(REPO / "tests" / "tiny_test.yaml"), *sets]
                (tmp_path / f"g{g}").mkdir(exist_ok=True)
                procs.append(subprocess.Popen(nodes.command(g, argv), cwd=REPO, env=child_env(PACE_FILE=str(pace)),
                                              stdout=(tmp_path / f"g{g}.log").open("w"), stderr=subprocess.STDOUT))
            jobs = procs[1:]

            def peers_since(g: int, step: int, value: int) -> bool:
                return any(r["step"] > step and r.get("peers") == value for r in records(runs[g]))

            wait_for("both groups exchanging", lambda: all(peers_since(g, 0, 1) for g in (0, 1)), 240, procs)
            down_at = [records(r)[-1]["step"] for r in runs]
            subprocess.run(["ip", "-n", nodes.ns[1], "link", "set", nodes.veth[1], "down"], check=True)
            time.sleep(DOWN_S)
            up_at = [records(r)[-1]["step"] for r in runs]
            subprocess.run(["ip", "-n", nodes.ns[1], "link", "set", nodes.veth[1], "up"], check=True)
            wait_for("exchanging again", lambda: all(peers_since(g, up_at[g], 1) for g in (0, 1)), 120, procs)
            pace.write_text("0")
            codes = [job.wait(timeout=240) for job in jobs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    logs = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in ("g0", "g1")}
    assert codes == [0, 0], logs
    for g in (0, 1):
        recs = records(runs[g])
        assert [r["step"] for r in recs] == list(range(1, 801)), logs  # never stopped, never restarted
        during = [r for r in recs if down_at[g] + 5 < r["step"] <= up_at[g]]
        # Kept training alone while the link was down: many steps, with no peer.
        assert up_at[g] - down_at[g] > 20, (down_at, up_at)
        assert during and all(r["peers"] == 0 for r in during), [r["peers"] for r in during]
