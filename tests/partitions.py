"""Assertions on what tests/workers/partition_check.py (and accelerate_cli.py) record: every rank
holds 1/S of each parameter (ZeRO-1/2: of each flat optimizer partition), S the group's ranks,
not 1/world; ranks of a group hold one model and the groups hold different ones."""

from __future__ import annotations


def assert_sharded_within_groups(res: list[dict], S: int) -> None:
    for r in res:
        assert r["S"] == S, r
        for p in r["parts"]:
            assert p["shard_size"] == S, p
            if p.get("group"):  # ZeRO-1/2: the flat group, padded to 2*S elements (4-byte aligned)
                assert p["local"] == -(-p["full"] // (2 * S)) * 2 < p["full"], p
            elif "mesh" not in p:  # ZeRO-3 flattens and pads each parameter to S equal partitions
                assert p["local"] == -(-p["full"] // S), p
            else:  # FSDP2 shards dim 0 into ceil(rows/S)-row chunks on the shard mesh
                assert p["mesh"] == ["dp_shard"]
                chunk = -(-p["rows"] // S)
                rows = max(0, min(chunk, p["rows"] - r["group_rank"] * chunk))
                assert p["local"] == rows * p["full"] // p["rows"], p
    groups = sorted({r["group"] for r in res})
    checksums = {g: {r["checksum"] for r in res if r["group"] == g} for g in groups}
    assert all(len(c) == 1 for c in checksums.values()), checksums
    assert len({c.pop() for c in checksums.values()}) == len(groups), checksums
