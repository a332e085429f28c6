"""`train.report_to` in one process: which fields become scalars, what the config accepts, and
that a MetricsWriter feeds TensorBoard the records it appends to metrics.jsonl. (The per-group
runs of a real job, TensorBoard and W&B, are checked in test_data_runs.py.)"""

from __future__ import annotations

import pytest
from dashboard_logs import tensorboard_scalars

from codistill_ds.config import ConfigError, load_config
from codistill_ds.config.validation import check_report_to, validate
from codistill_ds.run.dashboards import scalars
from codistill_ds.run.metrics import MetricsWriter, read_metrics


def test_every_numeric_field_is_a_scalar():
    record = {"step": 3, "group": 1, "loss": 2.5, "tokens": 384, "distill_loss": None, "alpha": 0.0,
              "peers": [0, 2], "flag": True, "new_ms": 1.5}
    assert scalars(record) == {"loss": 2.5, "tokens": 384.0, "alpha": 0.0, "new_ms": 1.5}


def test_report_to_is_checked_at_start():
    cfg = load_config(None, ["train.report_to=tensorboard"])  # one name is a list of one
    assert cfg.train.report_to == ["tensorboard"]
    validate(cfg, 2)
    assert load_config(None).train.report_to == ["none"]
    for value, message in ((["tensorbored"], "got 'tensorbored'; valid values: tensorboard, wandb, none"),
                           (["none", "wandb"], "'none' cannot be combined")):
        with pytest.raises(ConfigError, match=message) as err:
            check_report_to(value)
        assert err.value.field == "train.report_to"


def test_writer_feeds_tensorboard_what_it_appends(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True, report_to=["tensorboard"], group=1)
    for step in (1, 2, 3):
        writer.write({"step": step, "group": 1, "loss": 3.0 / step, "val_loss": None if step < 3 else 0.7,
                      "tokens": 64 * step})
    writer.close()
    writer.close()  # idempotent: dist.exit_process and atexit may both call it
    tb = tensorboard_scalars(tmp_path / "tb" / "group1")
    assert set(tb) == {"loss", "val_loss", "tokens"}
    for rec in read_metrics(str(tmp_path)):
        assert tb["loss"][rec["step"]] == [pytest.approx(rec["loss"])]
    assert tb["val_loss"] == {3: [pytest.approx(0.7)]} and tb["tokens"][2] == [128.0]
    silent = MetricsWriter(str(tmp_path / "other"), enabled=False, report_to=["tensorboard"], group=0)
    assert silent.sinks == [] and not (tmp_path / "other").exists()  # not the group's leader


def test_records_of_a_file_being_written(tmp_path):
    """A poller may read metrics.jsonl while a record is half written: that last line is left out
    until complete; a bad line anywhere else is corruption and raises."""
    import json

    import pytest

    from codistill_ds.run.metrics import read_metrics, read_records

    path = tmp_path / "metrics.jsonl"
    assert read_records(path) == []
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_records(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 1.5}\n')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_records(path)
