"""Bad input stops every rank of a real launch before training, with one line naming the cause:
groups with different vocabularies stop at the handshake; a binary data file stops every rank
of the real CLI. (The single-process properties are unit/test_bad_input.py.)"""

from __future__ import annotations

import pytest

from launch import REPO, WORKERS, cli, torchrun

CONFIG = str(REPO / "tests" / "tiny_test.yaml")


@pytest.mark.timeout(300)
def test_groups_with_different_vocabularies_stop_at_the_handshake(tmp_path):
    proc = torchrun(2, [str(WORKERS / "vocab_mismatch.py"), CONFIG, f"run_dir={tmp_path}",
                        "backend.name=fsdp"], timeout=240)
    assert proc.returncode != 0
    lines = [ln[ln.index("codistill-ds: error:"):] for ln in proc.stderr.splitlines()
             if "codistill-ds: error:" in ln]
    assert len(lines) == 2, proc.stderr[-3000:]  # the same message on both ranks
    for line in lines:
        assert "config field 'data.tokenizer'" in line and "vocabulary size" in line, line
        assert "256 on ranks [0] (group 0)" in line and "300 on ranks [1] (group 1)" in line, line
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.timeout(300)
def test_binary_data_file_stops_every_rank_before_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"text\x00\x01binary" * 100)
    proc = cli(2, "train", "--config", CONFIG, "--run-dir", str(tmp_path / "run"),
               "--set", "codistill.groups=2", "--set", f"data.train_files=[{corpus}]", timeout=240)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("codistill-ds: error:")]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert all(f"{corpus} looks binary (NUL byte at offset 4)" in ln for ln in lines), lines
    assert "codistill_ds/" not in proc.stderr  # no traceback from our code (torchrun prints its own)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

