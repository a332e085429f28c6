"""Single-process pieces of the Trainer integration: flags, masks, per-group paths and arguments."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from codistill_ds.config import CodistillConfig
from codistill_ds.distributed.axes import ParallelDims
from codistill_ds.integrations.exchange_data import distill_mask
from codistill_ds.integrations.hf_trainer import (
    CodistillTrainer,
    CodistillTrainerMixin,
    codistill_trainer,
)
from codistill_ds.integrations.hf_trainer.args import (
    PREFIX,
    CodistillArguments,
    field_docs,
)
from codistill_ds.integrations.hf_trainer.outputs import (
    group_checkpoint,
    group_leader_saves,
)


def test_every_codistill_field_is_a_flag_with_its_docstring():
    names = [f.name for f in dataclasses.fields(CodistillConfig)]
    flags = {f.name: f for f in dataclasses.fields(CodistillArguments)}
    docs = field_docs(CodistillConfig)
    for name in names:
        assert flags[PREFIX + name].metadata["help"].startswith(docs[name]) and docs[name] != ""
    assert set(flags) == {PREFIX + n for n in names} | {"codistill_exchange_batch_size", "codistill_peer_timeout_s"}


def test_command_line_round_trip():
    """Parsed flags give the CodistillConfig they spell; untouched fields keep the config's defaults."""
    parser = HfArgumentParser((CodistillArguments,))
    (args,) = parser.parse_args_into_dataclasses([
        "--codistill_groups", "4", "--codistill_alpha", "0.5", "--codistill_burn_in", "100", "--codistill_loss", "jsd",
        "--codistill_same_init", "--no_codistill_async_exchange", "--codistill_exchange_batch_size", "8",
        "--codistill_peer_weights", "[[1, 0.25]]"])
    expected = dataclasses.replace(CodistillConfig(), groups=4, alpha=0.5, burn_in=100, loss="jsd", same_init=True,
                                   async_exchange=False, peer_weights=[(1, 0.25)])
    assert args.to_config() == expected
    assert args.codistill_exchange_batch_size == 8 and args.codistill_peer_timeout_s == 180.0
    assert CodistillArguments.from_config(expected, exchange_batch_size=8).to_config() == expected


def test_distill_mask_drops_ignored_labels_and_padding():
    """Position t predicts label t+1: an ignore_index label at t+1 (or padding at t) masks t."""
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [1, 2, -100, -100]])
    mask = distill_mask({"input_ids": ids, "attention_mask": attention}, labels, -100)
    assert mask.tolist() == [False, True, True, True, True, False, False, False]
    assert distill_mask({"input_ids": ids}, None, -100) is None
    assert distill_mask({"input_ids": ids}, labels, -1).all()


def test_resume_path_is_mapped_to_my_group(tmp_path):
    for g in range(2):
        (tmp_path / f"group{g}" / "checkpoint-4").mkdir(parents=True)
    assert group_checkpoint(str(tmp_path / "checkpoint-4"), 1) == str(tmp_path / "group1" / "checkpoint-4")
    assert group_checkpoint(str(tmp_path / "group0" / "checkpoint-4"), 1) == str(tmp_path / "group1" / "checkpoint-4")
    assert group_checkpoint(str(tmp_path / "group1" / "checkpoint-4"), 1) == str(tmp_path / "group1" / "checkpoint-4")
    assert group_checkpoint(str(tmp_path / "checkpoint-9"), 1) == str(tmp_path / "checkpoint-9")  # the Trainer reports it
    assert group_checkpoint(True, 1) is True and group_checkpoint(None, 0) is None


def test_group_leaders_save_and_arguments_pickle_as_their_class(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    group_leader_saves(args, ParallelDims(world_size=4, groups=2, rank=2))
    assert args.should_save and isinstance(args, TrainingArguments)
    copy = pickle.loads(pickle.dumps(args))  # what training_args.bin holds
    assert type(copy) is TrainingArguments and copy.output_dir == str(tmp_path)
    group_leader_saves(args, ParallelDims(world_size=4, groups=2, rank=3))
    assert not args.should_save and type(args).__mro__[1] is TrainingArguments


def test_codistill_trainer_classes():
    class MyTrainer(Trainer):
        pass

    cls = codistill_trainer(MyTrainer)
    assert cls.__mro__[1:3] == (CodistillTrainerMixin, MyTrainer) and codistill_trainer(MyTrainer) is cls
    assert codistill_trainer(Trainer) is CodistillTrainer and codistill_trainer(cls) is cls


def test_bad_settings_fail_before_any_collective(monkeypatch):
    """Checked at construction, from the launcher's environment alone (no process group yet)."""
    from codistill_ds.config import ConfigError
    from codistill_ds.integrations.hf_trainer.callback import CodistillCallback

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="codistill_peer_timeout_s"):
        CodistillCallback(CodistillConfig(groups=2), peer_timeout_s=0)
    with pytest.raises(ConfigError, match="codistill.groups"):
        CodistillCallback(CodistillConfig(groups=3))
    with pytest.raises(ConfigError, match="codistill.exchange_batch"):
        CodistillCallback(CodistillConfig(groups=2, exchange_batch="train"))


