"""`codistill-ds tokenize`: text or JSONL files into memory-mapped token shards, once.

    codistill-ds tokenize corpus/*.txt --out data/shards      # then train with
                                                               #   --set data.train_files=[data/shards]
"""

from __future__ import annotations

import argparse
import sys


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    from codistill_ds.data.tokenize import SHARD_TOKENS

    p.add_argument("files", nargs="+", help="UTF-8 text or JSONL files, read in this order")
    p.add_argument("--out", required=True, help="new directory for the shards and index.json")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer directory")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl"],
                   help="auto: JSONL when every file ends in .jsonl/.json, else text")
    p.add_argument("--text-field", default="text", help="the JSONL key holding the document text")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from codistill_ds.data.sources import DataError
    from codistill_ds.data.tokenize import tokenize_files

    try:
        index = tokenize_files(args.files, args.out, args.tokenizer, args.format, args.text_field,
                               args.shard_tokens)
    except DataError as err:
        print(f"codistill-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"{index.tokens:,} tokens ({index.dtype}, vocab {index.vocab_size}) in {len(index.shards)} "
          f"shard(s) at {args.out}; digest {index.digest[:16]}")
    return 0
