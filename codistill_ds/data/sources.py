"""Where training text comes from: local text/JSONL files (read through `datasets`, checked
before they can break deep inside it) or the built-in corpus, which needs no download.

Shared by the three ways a corpus reaches the streams (data.py): tokenized in memory at start,
tokenized once into shards (tokenize.py), or streamed at run time (streaming.py).
"""

from __future__ import annotations

import codecs
import os
import sysconfig
from pathlib import Path

from codistill_ds.config import DataConfig

FILE_FORMATS = ("text", "jsonl")


class DataError(ValueError):
    """A corpus that cannot feed the configured run; raised before training starts."""


def resolve_format(fmt: str, files: list[str]) -> str:
    """"auto" reads JSONL when every file ends in .jsonl/.json, text otherwise."""
    if fmt != "auto":
        return fmt
    return "jsonl" if all(f.endswith((".jsonl", ".json")) for f in files) else "text"


def load_local_dataset(files: list[str], fmt: str, streaming: bool = False, sample_by: str = "document"):
    """`datasets.load_dataset` on local files only (offline): a Dataset, or an IterableDataset
    when `streaming`. Text files are one row per `sample_by` unit ("document": the whole file)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    try:
        if fmt == "text":
            return load_dataset("text", data_files=list(files), sample_by=sample_by, split="train",
                                streaming=streaming)
        return load_dataset("json", data_files=list(files), split="train", streaming=streaming)
    except Exception as err:  # noqa: BLE001 -- datasets wraps parse errors in varying types
        raise read_error(files, fmt, err) from None


def read_error(files: list[str], fmt: str, err: Exception) -> DataError:
    cause = err.__cause__ or err
    first = str(cause).splitlines()[0][:200] if str(cause) else ""
    return DataError(f"data.train_files: cannot read {list(files)} as {fmt}: {type(cause).__name__}: {first}")


SKIPPED_TOP = frozenset({"test", "site-packages", "idlelib", "lib2to3"})
"""Top-level stdlib folders left out of the built-in corpus (test data with huge generated
literals, third-party packages, the IDE); any folder named `tests` is left out as well."""


def stdlib_paths(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in the corpus, in Path order.

    Walks with the skipped folders pruned rather than globbing everything and filtering: every
    rank of every launch reads the corpus at start, and the glob also listed site-packages
    (13k paths: 0.8 s per rank on a quiet machine here, 4 s under load; the walk: 0.07 s)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    found = []
    for folder, subdirs, files in os.walk(root):
        if Path(folder) == root:
            subdirs[:] = [d for d in subdirs if d not in SKIPPED_TOP]
        subdirs[:] = [d for d in subdirs if d != "tests"]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def stdlib_sources(max_bytes: int | None) -> list[str]:
    """The installed standard library's .py files, sorted: a corpus on every machine, no download.

    Test suites are skipped (huge generated literals) and files are read in a fixed order, so the
    corpus is a deterministic function of the Python version."""
    texts, total = [], 0
    for path in stdlib_paths():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if max_bytes and total >= max_bytes:
            break
    return texts


def read_documents(cfg: DataConfig) -> list[str]:
    """Documents from local text/jsonl files through `datasets`, or the built-in corpus."""
    if not cfg.train_files:
        return stdlib_sources(cfg.max_bytes)
    for path in cfg.train_files:
        check_text_file(path)
    fmt = resolve_format(cfg.format, cfg.train_files)
    ds = load_local_dataset(cfg.train_files, fmt)
    if fmt == "text":
        return list(ds["text"])
    if cfg.text_field not in ds.column_names:
        raise DataError(f"data.text_field: '{cfg.text_field}' not in the jsonl columns {ds.column_names}")
    texts = list(ds[cfg.text_field])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"data.text_field: '{cfg.text_field}' of row {bad} is {texts[bad]!r}, not text")
    return texts


def check_text_file(path: str, chunk: int = 1 << 20) -> None:
    """Fail on files that would train on garbage or break deep inside `datasets`: an empty file,
    a binary one (text never holds a NUL byte), or bytes that are not UTF-8."""
    if os.path.getsize(path) == 0:
        raise DataError(f"data.train_files: {path} is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataError(f"data.train_files: {path} looks binary (NUL byte at offset "
                                f"{offset + nul}); expected UTF-8 text or JSONL")
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                at = offset + err.start - (len(err.object) - len(block))
                raise DataError(f"data.train_files: {path} is not UTF-8 (byte 0x{err.object[err.start]:02x} "
                                f"at offset {at}); re-encode it, e.g. iconv -f latin1 -t utf-8") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"data.train_files: {path} is not UTF-8 (it ends inside a multi-byte "
                        "character)") from None
