"""`CodistillArguments`: every codistillation setting as a command-line flag of a Trainer script.

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, CodistillArguments))
    model_args, data_args, training_args, codistill_args = parser.parse_args_into_dataclasses()

    python run_clm.py ... --codistill_groups 2 --codistill_alpha 1 --codistill_burn_in 100

The dataclass is generated from `config.CodistillConfig`, one `codistill_<field>` per field with
the field's docstring as its `--help`, so a field added to the config is a flag the same day and
the two cannot drift apart. Two flags exist only on the Trainer path, where the CLI takes them
from other config sections: `codistill_exchange_batch_size` (the CLI's
`data.exchange_batch_size`) and `codistill_peer_timeout_s` (the CLI's `backend.peer_timeout_s`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from codistill_ds.config import BackendConfig, CodistillConfig, DataConfig
from codistill_ds.config.doc import field_docs

PREFIX = "codistill_"


class _CodistillArgumentsBase:
    """Methods of the generated `CodistillArguments` dataclass."""

    def to_config(self) -> CodistillConfig:
        """The `CodistillConfig` these flags describe (the Trainer-only flags are not part of it)."""
        from codistill_ds.config.load import _apply

        config = CodistillConfig()
        values = {}
        for f in dataclasses.fields(CodistillConfig):
            value = getattr(self, PREFIX + f.name)
            if f.default is dataclasses.MISSING:  # a list field given as YAML text (or left out)
                if value is None:
                    continue
                value = yaml.safe_load(value) if isinstance(value, str) else value
            values[f.name] = value
        _apply(config, values, "codistill.")  # the config's own type checks and error messages
        return config

    @classmethod
    def from_config(cls, config: CodistillConfig, **extra: Any) -> Any:
        """The flags of a `CodistillConfig`, plus `exchange_batch_size=` / `peer_timeout_s=`."""
        values = {PREFIX + k: (yaml.safe_dump([list(p) for p in v], default_flow_style=True).strip()
                               if isinstance(v, list) else v)
                  for k, v in dataclasses.asdict(config).items()}
        values.update({PREFIX + k: v for k, v in extra.items()})
        return cls(**values)


def _spec(name: str, tp: Any, default: Any, doc: str) -> tuple[str, Any, Any]:
    return (PREFIX + name, tp, dataclasses.field(default=default, metadata={"help": doc}))


def _build() -> type:
    hints = typing.get_type_hints(CodistillConfig)
    docs = field_docs(CodistillConfig)
    specs = []
    for f in dataclasses.fields(CodistillConfig):
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            # A list field (peer_weights): one YAML string on the command line.
            specs.append(_spec(f.name, str | None, None, docs.get(f.name, "") + " Given as YAML, e.g. '[[0, 0.5]]'."))
            continue
        if f.default is dataclasses.MISSING:
            raise TypeError(f"CodistillConfig.{f.name} needs a plain default to become a command-line flag")
        specs.append(_spec(f.name, hints[f.name], f.default, docs.get(f.name, "")))
    data_docs, backend_docs = field_docs(DataConfig), field_docs(BackendConfig)
    specs.append(_spec("exchange_batch_size", int | None, None, data_docs["exchange_batch_size"].replace(
        "micro_batch_size", "per_device_train_batch_size")))
    specs.append(_spec("peer_timeout_s", float, BackendConfig.peer_timeout_s, backend_docs["peer_timeout_s"].replace(
        "timeout_s instead", "TrainingArguments.ddp_timeout instead")))
    cls = dataclasses.make_dataclass("CodistillArguments", specs, bases=(_CodistillArgumentsBase,))
    cls.__module__ = __name__
    cls.__doc__ = ("Codistillation flags for `HfArgumentParser`: `--codistill_<field>` for every "
                   "`CodistillConfig` field, plus `--codistill_exchange_batch_size` and `--codistill_peer_timeout_s`.")
    return cls


CodistillArguments = _build()
