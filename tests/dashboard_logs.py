"""Read back what the dashboards wrote: TensorBoard scalars (tensorboard's EventAccumulator) and
the history of a W&B offline run file (run-*.wandb), without the network or the W&B service.

The W&B file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of records, each with a 7-byte header (crc32, length uint16, type uint8: 1 full,
2 first, 3 middle, 4 last) around a serialized `wandb_internal_pb2.Record`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, list[float]]]:
    """tag -> step -> values, after TensorBoard's own purge of events a restart superseded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(tag, {}).setdefault(event.step, []).append(event.value)
    return out


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    """step -> {metric: value} of every logged history row."""
    out: dict[int, dict[str, float]] = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.history.item}
        step = rec.history.step.num if rec.history.HasField("step") else row.get("_step")
        out[int(step)] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out
