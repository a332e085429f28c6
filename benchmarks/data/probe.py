"""One process, no ranks: the resident memory and time of one rank's data streams, for
`python -m benchmarks.data` and tests/dist/test_shards.py. Args: OUT TRAIN_FILE STEPS. Builds the corpus
(a token-shard directory, or a text file tokenized in memory), the streams of rank 0 of group 0
of 2 groups x 2 ranks (training, exchange, validation; seq_len 128, 8 sequences per rank) and
the start-up fingerprint digest, draws STEPS steps of batches, and writes /proc/self/status
figures (kB) before and after, and the seconds each part took, to OUT as JSON."""

from __future__ import annotations

import json
import sys
import time

from codistill_ds.config import DataConfig
from codistill_ds.data.corpus import build_corpus, corpus_digest
from codistill_ds.data.streams import ExchangeStream, TrainStream, val_micro_batches


def status() -> dict[str, int]:
    keep = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keep:
                out[key] = int(value.split()[0])
    return out


def main() -> None:
    out, train_file, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    before = status()
    cfg = DataConfig(train_files=[train_file], max_bytes=None, seq_len=128, micro_batch_size=8, val_batches=8)
    t = time.perf_counter()
    corpus = build_corpus(cfg)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    digest = corpus_digest(corpus.train)
    digest_s = time.perf_counter() - t
    train = TrainStream(corpus, 1, 0, 2, 0, 2, 8, 1)
    exchange = ExchangeStream(corpus, 1, 16, 0, 2)
    val = val_micro_batches(corpus, 0, 2, 8, 8)
    checksum, t = 0, time.perf_counter()
    for step in range(steps):
        checksum += int(train.micro_batch(step, 0).sum()) + int(exchange.batch_slice(step).sum())
    draw_s = time.perf_counter() - t
    after = status()
    with open(out, "w") as f:
        json.dump({"before": before, "after": after, "windows": len(corpus.train), "val_batches": len(val),
                   "digest": digest, "digest_s": digest_s, "build_s": build_s, "draw_s": draw_s,
                   "checksum": checksum}, f)


if __name__ == "__main__":
    main()
