"""Corpora streamed through `datasets` at run time (`data.streaming`): the guarantees of the
random-access streams, checked against references computed another way.

Three text files (tinyshakespeare, read by path, cut in three), 2 groups. Checked: groups'
documents (paragraphs, assigned by content hash) are disjoint, cover the training documents and
stay the same every epoch, validation documents are in neither; the packed windows equal the
in-memory layout of the same documents; a fresh stream asked for step t (a resumed run) gives
the straight stream's batches; rank slices tile the group's stream; the exchange stream is the
unsplit training stream for every group; epochs reshuffle the same documents.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.data.corpus import SHAKESPEARE
from codistill_ds.config import DataConfig
from codistill_ds.data.corpus import _windows, build_corpus, corpus_digest
from codistill_ds.data.sources import DataError
from codistill_ds.data.streaming import DocumentStream, group_of, is_validation
from codistill_ds.data.streams import ExchangeStream, TrainStream, val_micro_batches
from codistill_ds.data.tokenizers import ByteTokenizer

SEQ, B, SEED = 64, 4, 11


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    text = SHAKESPEARE.read_text()[:450_000]
    cuts = [0, 150_000, 300_000, len(text)]
    files = []
    for i in range(3):  # cut at paragraph ends so no document spans two files
        lo, hi = text.find("\n\n", cuts[i]) + 2 if i else 0, text.find("\n\n", cuts[i + 1]) if i < 2 else len(text)
        (tmp / f"part{i}.txt").write_text(text[lo:hi])
        files.append(str(tmp / f"part{i}.txt"))
    cfg = DataConfig(train_files=files, streaming=True, seq_len=SEQ, micro_batch_size=B, shuffle_buffer=256,
                     val_fraction=0.05)
    return cfg, build_corpus(cfg)


def docs(stream: DocumentStream, seed=None, epoch=0) -> list[str]:
    return list(stream.texts(seed, epoch))


def test_groups_split_documents_and_validation_is_held_out(corpus):
    _, c = corpus
    assert isinstance(c.train, DocumentStream) and c.vocab_size == 256
    everything = docs(c.train) + docs(c.val)
    assert len(docs(c.val)) > 0 and all(is_validation(d, 20) for d in docs(c.val))
    assert not set(docs(c.val)) & set(docs(c.train))
    g0, g1 = (docs(c.train.for_group(g, 2), SEED) for g in (0, 1))
    assert Counter(g0) + Counter(g1) == Counter(docs(c.train))  # a partition of the training docs
    assert {group_of(d, 20, 2) for d in g1} == {1}
    assert 0.4 < len(g0) / (len(g0) + len(g1)) < 0.6 and len(everything) > 1000
    assert sorted(docs(c.train.for_group(0, 2), SEED, 1)) == sorted(g0)  # epoch 1: same docs ...
    assert docs(c.train.for_group(0, 2), SEED, 1) != g0  # ... in another order


def test_windows_have_the_in_memory_layout(corpus):
    _, c = corpus
    group = c.train.for_group(1, 2)
    expected = _windows(ByteTokenizer().encode("\n".join(docs(group, SEED))), SEQ)
    stream = TrainStream(c, SEED, 1, 2, 0, 1, B, 1)  # one rank: the group's windows in order
    n = len(expected) // B
    got = torch.cat([stream.micro_batch(t, 0) for t in range(n)])
    assert torch.equal(got, expected[: n * B])
    nxt = stream.micro_batch(n + 2, 0)  # the next epoch starts a fresh packing
    again = _windows(ByteTokenizer().encode("\n".join(docs(group, SEED, 1))), SEQ)
    first = (n + 2) * B - len(expected)
    assert torch.equal(nxt, again[first: first + B])


def test_resume_rank_slices_and_exchange(corpus):
    _, c = corpus
    S, A = 2, 2
    for g in range(2):
        straight = [TrainStream(c, SEED, g, 2, r, S, B, A) for r in range(S)]
        batches = {(r, t, m): straight[r].micro_batch(t, m) for r in range(S) for t in range(40) for m in range(A)}
        for t in (0, 17, 39):  # a resumed run builds its stream afresh at step t
            for r in range(S):
                fresh = TrainStream(c, SEED, g, 2, r, S, B, A)
                assert all(torch.equal(fresh.micro_batch(t, m), batches[r, t, m]) for m in range(A))
        one_rank = TrainStream(c, SEED, g, 2, 0, 1, S * B, A)  # the group's stream, unsliced
        for t in (3, 30):
            whole = one_rank.micro_batch(t, 1)
            assert torch.equal(whole, torch.cat([batches[r, t, 1] for r in range(S)]))
    ex = [ExchangeStream(c, SEED, 8, r, 2) for r in range(2)]
    unsliced = ExchangeStream(c, SEED, 8, 0, 1)
    for e in (0, 5, 60):
        assert torch.equal(torch.cat([x.batch_slice(e) for x in ex]), unsliced.batch_slice(e))
    assert not torch.equal(ex[0].batch_slice(5), TrainStream(c, SEED, 0, 2, 0, 1, 4, 1).micro_batch(5, 0))


def test_validation_and_digest(corpus, tmp_path):
    cfg, c = corpus
    val = val_micro_batches(c, 1, 2, B, 3)
    head = _windows(ByteTokenizer().encode("\n".join(docs(c.val))), SEQ)
    assert len(val) == 3 and torch.equal(torch.cat(val), head[np.r_[4:8, 12:16, 20:24]])
    assert corpus_digest(c.train) != corpus_digest(c.val)
    copy = [tmp_path / f"copy{i}.txt" for i in range(3)]  # same content elsewhere: same digest
    for src, dst in zip(cfg.train_files, copy):
        dst.write_bytes(Path(src).read_bytes())
    moved = build_corpus(DataConfig(**{**cfg.__dict__, "train_files": [str(p) for p in copy]}))
    assert corpus_digest(moved.train) == corpus_digest(c.train)
    with pytest.raises(DataError, match="fewer than one micro-batch of 4"):
        build_corpus(DataConfig(**{**cfg.__dict__, "val_fraction": 0.0004}))


def test_built_in_corpus_files_are_the_filtered_glob_of_the_stdlib(tmp_path):
    """The pruned walk lists exactly the files the glob-then-filter did (same set, same order),
    on the installed stdlib and on a tree with the edge cases: a skipped name below the top level
    is kept, `tests` is skipped at any depth, Path order differs from string order ('a-b' vs 'a/')."""
    import sysconfig

    from codistill_ds.data.sources import SKIPPED_TOP, stdlib_paths

    def globbed(root: Path) -> list[Path]:
        return [p for p in sorted(root.rglob("*.py"))
                if p.relative_to(root).parts[0] not in SKIPPED_TOP and "tests" not in p.relative_to(root).parts]

    for rel in ("a.py", "a/b.py", "a-b/c.py", "test/x.py", "idlelib/y.py", "pkg/test/z.py", "pkg/tests/w.py",
                "tests/v.py", "pkg/site-packages/u.py", "pkg/readme.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert stdlib_paths(tmp_path) == globbed(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in stdlib_paths(tmp_path)] == [
        "a/b.py", "a-b/c.py", "a.py", "pkg/site-packages/u.py", "pkg/test/z.py"]  # by parts, not by string
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib_paths() == globbed(stdlib) and len(stdlib_paths()) > 300
