"""The Trainer integration's exchange data check over two real ranks."""

from __future__ import annotations

import pytest

@pytest.mark.timeout(240)
def test_ranks_with_different_exchange_data_all_refuse(tmp_path):
    """Two groups of one rank; the second builds a different row 5: both ranks raise the same error."""
    from launch import run_worker

    results = run_worker("exchange_data_check", 2, tmp_path)
    messages = {r["raised"] for r in results}
    assert len(messages) == 1 and None not in messages, messages
    (message,) = messages
    assert "config field 'train_dataset'" in message and "ranks [0]" in message and "ranks [1]" in message, message

