"""Rank program: the ranks of the second half of the world (the last group) get a tokenizer with
a larger vocabulary, as if their node had other tokenizer files. Args: CONFIG [overrides...].
Exits with `main_guarded`'s status: the start-of-run handshake must stop every rank."""

from __future__ import annotations

import os
import sys

from codistill_ds.commands.train import main_guarded
from codistill_ds.config import load_config
from codistill_ds.data.tokenizers import ByteTokenizer
from codistill_ds.run import job


class WiderTokenizer(ByteTokenizer):
    vocab_size = 300


def main() -> None:
    original = job.load_tokenizer
    late = int(os.environ["RANK"]) >= int(os.environ["WORLD_SIZE"]) // 2
    job.load_tokenizer = lambda spec: WiderTokenizer() if late else original(spec)
    sys.exit(main_guarded(load_config(sys.argv[1], sys.argv[2:])))


if __name__ == "__main__":
    main()
