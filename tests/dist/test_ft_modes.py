"""Every exchange mode over `transport: torchft` equals `transport: world` (issue 22, item 2).

One launch per mode: the world job (K groups x S ranks in one torchrun; rails and weights, both
K x S = 4, share one world launch) and K torchft jobs of S ranks each, started at once against a
real Lighthouse, on the same config. Per (group,
step): the loss, the distillation loss and agreement to 1e-6, the cross-group bytes and the
peer count equal; the predictions (or weight shards) each rank sent and received equal bit for
bit.

  train    exchange_batch train, route leaders, K = 3 (with 2 groups an all-to-all is an
           all-gather: a prediction sent to the wrong owner would go unnoticed), FSDP2
  rails    route rails, shared exchange batches, asynchronous one step stale (the per-rank
           memberships on the exchange thread; nothing is due at the first step), K = 2, FSDP2
  weights  mode weights over rail memberships, K = 2, ZeRO-3: every teacher holds its peer's
           shard of the last round
The torchft jobs share a secret (CODISTILL_SECRET): every frame of every collective (the
leaders' all-to-all, each rail's all-gather, the weight shards) is signed and checked, and the
figures still equal the world job's (which has no frames at all).

Plus `stale_teachers`: three one-rank jobs, group 2 leaves after 3 steps; group 0 (keep) goes
on distilling from its last weights, group 1 (drop) from group 1's other peer only. A job that
ends leaves with a retire mark, and the others then train without peers, without blocking,
until the Lighthouse drops the retired member (its heartbeat timeout): groups 0 and 1 run long
enough to meet again afterwards, and group 1 ends first, so its last round still has group 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ft_jobs import finish, lighthouse, log_tail, records, start_job

pytestmark = pytest.mark.timeout(900)

S = 2
MODES = {  # name: (K, steps, overrides)
    "train": (3, 8, ["codistill.exchange_batch=train", "backend.name=fsdp"]),
    "rails": (2, 8, ["codistill.route=rails", "codistill.staleness=1", "codistill.async_exchange=true",
                     "backend.name=fsdp"]),
    "weights": (2, 7, ["codistill.mode=weights", "codistill.interval=2", "train.eval_interval=0"]),
}
TOL = 1e-6
SECRET = "ft-modes-test-secret-0123456789"
SHARED_WORLD = ("rails", "weights")
"""Modes of one world size (K x S = 4 ranks): the first one's world launch runs both, one after
the other (tests/workers/runs.py), so the second starts only its torchft jobs."""
WORLD: dict[str, Path] = {}
"""mode: its world run's out dir (rank{r}.json; run/ holds the metrics)."""


def common_of(mode: str) -> list[str]:
    k, steps, extra = MODES[mode]
    return [f"codistill.groups={k}", "codistill.alpha=1", f"train.steps={steps}", *extra]


def launch_mode(tmp: Path, mode: str) -> dict:
    """The world job (unless an earlier launch ran this mode's world) and the K torchft jobs
    side by side; returns the seconds they took."""
    k = MODES[mode][0]
    common = common_of(mode)
    server, url = lighthouse(join_timeout_ms=60000)
    start = time.monotonic()
    jobs = {}
    try:
        if mode not in WORLD:
            together = [m for m in SHARED_WORLD if m not in WORLD] if mode == SHARED_WORLD[0] else [mode]
            runs = []
            for m in together:
                WORLD[m] = tmp / "world" / m
                runs += [f"@{m}", *common_of(m), f"run_dir={WORLD[m] / 'run'}"]
            jobs["world"] = start_job(k * S, tmp / "world", runs, tmp / "world.log")
        for g in range(k):
            ft = ["codistill.transport=torchft", f"codistill.group_id={g}", f"codistill.lighthouse={url}",
                  f"run_dir={tmp / f'g{g}' / 'run'}"]
            jobs[f"g{g}"] = start_job(S, tmp / f"g{g}", [*common, *ft], tmp / f"g{g}.log", CODISTILL_SECRET=SECRET)
        for name, job in jobs.items():
            assert finish(job, 600) == 0, f"{mode} {name}:\n{log_tail(tmp / f'{name}.log')}"
    finally:
        server.shutdown()
    return {"mode": mode, "k": k, "seconds": time.monotonic() - start, "world": str(WORLD[mode])}


@pytest.fixture(scope="module", params=list(MODES))
def mode_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    facts = launch_mode(tmp, request.param)
    return tmp, facts


def test_every_mode_over_torchft_equals_world(mode_run):
    tmp, facts = mode_run
    mode, k = facts["mode"], facts["k"]
    world_dir = Path(facts["world"])
    world = {(r["group"], r["step"]): r for r in records(world_dir / "run")}
    ft = {(r["group"], r["step"]): r for g in range(k) for r in records(tmp / f"g{g}" / "run")}
    steps = MODES[mode][1]
    assert world.keys() == ft.keys() and len(world) == k * steps
    worst = {"loss": 0.0, "distill_loss": 0.0, "agreement": 0.0}
    for key in sorted(world):
        w, f = world[key], ft[key]
        for name in list(worst):
            assert (w.get(name) is None) == (f.get(name) is None), (key, name)
            if w.get(name) is not None:
                diff = abs(w[name] - f[name])
                worst[name] = max(worst[name], diff)
                assert diff <= TOL, (key, name, w[name], f[name])
        assert w["cross_group_bytes"] == f["cross_group_bytes"], key
        assert not f.get("skipped_peers"), (key, f.get("skipped_reasons"))  # every signed frame verified
        assert w["peers"] == f["peers"] == (None if key[1] == 1 and mode == "rails" else k - 1), key
    assert all(world[(g, s)]["distill_loss"] > 0 for g in range(k) for s in range(3, steps + 1))
    assert world[(0, steps)]["cross_group_bytes"] > 0
    for g in range(k):
        for r in range(S):
            w = json.loads((world_dir / f"rank{g * S + r}.json").read_text())
            f = json.loads((tmp / f"g{g}" / f"rank{r}.json").read_text())
            assert w["weights"] == f["weights"], (g, r)
            if mode == "weights":
                assert w["teachers"] == f["teachers"] and w["last_sent"] == f["last_sent"], (g, r)
                assert f["teacher_groups"] == [h for h in range(k) if h != g]
            else:
                assert w["sent"] == f["sent"] and w["recv"] == f["recv"] and len(f["recv"]) == steps, (g, r)
    if mode == "weights":  # each teacher is the peer's shard of the last round (rank r's, rank r's)
        for g in range(k):
            for r in range(S):
                f = json.loads((tmp / f"g{g}" / f"rank{r}.json").read_text())
                for h, teacher in f["teachers"].items():
                    assert teacher == json.loads((tmp / f"g{h}" / f"rank{r}.json").read_text())["last_sent"]
    facts["max_diff"] = worst
    print(f"\n{mode}: K={k} S={S}, world + torchft launched side by side in {facts['seconds']:.0f} s; "
          f"max |world - torchft|: {worst}")
    (tmp / "facts.json").write_text(json.dumps(facts))


# ---- stale teachers ---------------------------------------------------------------------------------

@pytest.mark.quiet  # 1 s heartbeats: under the background load group 1 once saw group 0 gone at its last step
def test_a_peer_that_left_is_kept_as_a_stale_teacher_or_dropped(tmp_path):
    server, url = lighthouse(join_timeout_ms=1000, heartbeat_timeout_ms=1000)
    common = ["codistill.groups=3", "codistill.mode=weights", "codistill.alpha=1", "backend.name=fsdp",
              "train.eval_interval=0", "codistill.exchange_timeout_s=5", "codistill.join_timeout_s=120",
              "codistill.transport=torchft", f"codistill.lighthouse={url}"]
    plan = {0: ["codistill.stale_teachers=keep", "train.steps=70"],
            1: ["codistill.stale_teachers=drop", "train.steps=60"],
            2: ["train.steps=3"]}
    try:
        jobs = {g: start_job(1, tmp_path / f"g{g}", [*common, *extra, f"codistill.group_id={g}",
                                                     f"run_dir={tmp_path / f'g{g}' / 'run'}"], tmp_path / f"g{g}.log")
                for g, extra in plan.items()}
        for g, job in jobs.items():
            assert finish(job, 600) == 0, f"g{g}:\n{log_tail(tmp_path / f'g{g}.log')}"
    finally:
        server.shutdown()
    facts = {g: json.loads((tmp_path / f"g{g}" / "rank0.json").read_text()) for g in range(3)}
    peers = {g: [r["peers"] for r in records(tmp_path / f"g{g}" / "run")] for g in (0, 1)}
    for g in (0, 1):
        assert peers[g][:3] == [2, 2, 2], peers  # all three while group 2 ran
    assert peers[0][-1] == 2 and facts[0]["teacher_groups"] == [1, 2], peers  # keep: 2 stays, stale
    assert facts[1]["teacher_groups"] == [0], facts[1]  # drop: 2 is left out
    # group 1 still met a peer after 2 retired (group 0, the only one left; how many of the last
    # rounds it made under 1 s heartbeats is timing: 2 of 5 full runs saw it end with no live peer)
    assert 1 in peers[1][3:], peers
    assert set(peers[1][3:]) <= {0, 1}, peers  # drop: never group 2 again (0: rounds alone after it retired)
    assert facts[0]["teachers"]["2"] == facts[2]["last_sent"]  # group 2's weights of its last round
    assert facts[0]["teachers"]["1"] == facts[1]["last_sent"]
    print(f"\nstale teachers: peers per step keep={peers[0]} drop={peers[1]}")
