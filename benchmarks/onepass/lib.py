"""Every library internal this benchmark uses, imported in one place.

The single-process trainer (trainer.py) builds what the CLI's loop builds for one 1-rank group at
global batch G from these pieces.
"""

from __future__ import annotations

from codistill_ds.backends.base import decay_param_groups, set_optimizer_hyperparameters
from codistill_ds.backends.model import build_model, count_parameters
from codistill_ds.config import Config, load_config
from codistill_ds.data.corpus import Corpus, build_corpus
from codistill_ds.data.sources import stdlib_sources
from codistill_ds.data.streams import TrainStream
from codistill_ds.schedules import lr_at

__all__ = ["Config", "Corpus", "TrainStream", "build_corpus", "build_model", "count_parameters",
           "decay_param_groups", "load_config", "lr_at", "set_optimizer_hyperparameters",
           "stdlib_sources"]
