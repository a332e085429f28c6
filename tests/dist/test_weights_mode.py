"""Weight-exchange codistillation: each teacher is bit-for-bit the peer's shard at the last
exchange, and only parameter shards of that size crossed groups."""

from __future__ import annotations

import pytest

from launch import REPO, run_worker

pytestmark = pytest.mark.timeout(300)

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
STEPS, INTERVAL = 7, 3  # exchanges before steps 0, 3, 6; step 6 still updates afterwards


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_teacher_equals_peer_weights_from_last_exchange(tmp_path, backend):
    res = run_worker("weights_check", 4, tmp_path, CONFIG, f"run_dir={tmp_path / 'run'}",
                     "codistill.mode=weights", "codistill.alpha=1", f"codistill.interval={INTERVAL}",
                     f"train.steps={STEPS}", f"backend.name={backend}")
    at = {(r["group"], r["group_rank"]): r for r in res}
    for (g, lr), r in at.items():
        for peer, teacher_digest in r["teachers"].items():
            sender = at[(int(peer), lr)]
            assert teacher_digest == sender["sent"]
            assert teacher_digest != sender["current"]  # the peer trained on after sending
        exchanges = -(-STEPS // INTERVAL)
        assert r["bytes"] == exchanges * r["shard_numel"] * 4 * (2 - 1)  # fp32 shards, K-1 peers
    assert at[(0, 0)]["sent"] != at[(1, 0)]["sent"]
