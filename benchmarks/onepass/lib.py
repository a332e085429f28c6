"""Every library internal this benchmark uses, imported in one place.

The package is being restructured (module paths under `codistill_ds/` move, e.g. `data.py` ->
`data/streams.py`): only this file needs its imports updated then. Nothing here re-implements
the library; the single-process trainer (trainer.py) builds what the CLI's loop builds for one
1-rank group at global batch G from these pieces.
"""

from __future__ import annotations

from codistill_ds.backends.base import decay_param_groups, set_optimizer_hyperparameters
from codistill_ds.config import Config, load_config
from codistill_ds.data import Corpus, TrainStream, build_corpus
from codistill_ds.model import build_model, count_parameters
from codistill_ds.schedules import lr_at
from codistill_ds.sources import stdlib_sources

__all__ = ["Config", "Corpus", "TrainStream", "build_corpus", "build_model", "count_parameters",
           "decay_param_groups", "load_config", "lr_at", "set_optimizer_hyperparameters",
           "stdlib_sources"]
