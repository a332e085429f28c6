"""The one typed configuration of a codistillation run.

Merge rule, the only one: ``--set`` overrides > YAML file > dataclass defaults. The YAML file
is a nested mapping that mirrors the sections below (``model:``, ``data:``, ``codistill:``,
``optim:``, ``train:``, ``backend:``, plus top-level ``seed`` and ``run_dir``). An override is
``section.field=value``; the value is read with ``yaml.safe_load`` (so ``3``, ``0.5``,
``true``, ``[1, 2]`` and ``null`` work) and then checked against the field's type. Unknown
keys, at any level, are errors that name the dotted key and list the valid ones.

Loading only checks types; ``validation.validate`` checks values against the world size (and vocabulary)
so that a bad config fails at start, on every rank, with one line naming the field, before any
collective call can hang. It raises the first problem found, as a ``ConfigError`` whose
``field`` is the dotted name and whose message names the values involved.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from codistill_ds.config.schema import PACKAGE_DIR, PACKAGE_ROOT, Config, ConfigError


def _fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _bad(name: str, value: Any, want: str) -> ConfigError:
    return ConfigError(name, f"expected {want}, got {value!r} ({type(value).__name__})")


def _number(text: str) -> int | float | None:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return None


_WANT = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce_scalar(name: str, value: Any, tp: type) -> Any:
    if tp in (int, float) and isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as text
        parsed = _number(value)
        value = value if parsed is None else parsed
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and (isinstance(value, str) or number):
        return str(value)
    if tp is float and number:
        return float(value)
    if tp is int and number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if tp not in _WANT:
        raise TypeError(f"unsupported config type {tp!r} for {name}")
    raise _bad(name, value, _WANT[tp])


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _bad(name, value, "a list")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _bad(name, value, f"a list of {len(args)} items")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    return _coerce_scalar(name, value, tp)


def _unknown(prefix: str, key: Any, valid: Sequence[str]) -> ConfigError:
    name = f"{prefix}{key}"
    return ConfigError(name, f"unknown key '{name}'; valid keys: {', '.join(valid)}")


def _apply(obj: Any, mapping: Any, prefix: str) -> None:
    """Merge a (YAML) mapping into the dataclass ``obj`` in place."""
    if not isinstance(mapping, dict):
        raise _bad(prefix.rstrip(".") or "config", mapping, "a mapping of keys to values")
    hints = _fields(obj)
    for key, value in mapping.items():
        if key not in hints:
            raise _unknown(prefix, key, list(hints))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, {} if value is None else value, f"{prefix}{key}.")  # empty section
        else:
            setattr(obj, key, _coerce(f"{prefix}{key}", value, hints[key]))


def _is_text(tp: Any) -> bool:
    return tp is str or str in typing.get_args(tp)


def _override(cfg: Config, item: str) -> None:
    """Apply one ``a.b=value`` override."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", f"expected key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from None
    *parents, leaf = key.split(".")
    obj, prefix = cfg, ""
    for part in parents:
        hints = _fields(obj)
        if part not in hints or not dataclasses.is_dataclass(getattr(obj, part)):
            sections = [k for k in hints if dataclasses.is_dataclass(getattr(obj, k))]
            raise ConfigError(
                f"{prefix}{part}",
                f"unknown section '{prefix}{part}' in '{key}'; valid sections: "
                + ", ".join(sections),
            )
        obj, prefix = getattr(obj, part), f"{prefix}{part}."
    hints = _fields(obj)
    if leaf not in hints:
        raise _unknown(prefix, leaf, list(hints))
    if _is_text(hints[leaf]) and isinstance(value, (bool, int, float)):
        value = raw.strip()  # a run_dir of "2024" or a path "1.0" stays the text typed
    _apply(obj, {leaf: value}, prefix)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then each ``a.b=value`` override."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError("config", f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"cannot parse YAML {path}: {exc}") from None
        if data is not None:
            _apply(cfg, data, "")
    for item in overrides:
        _override(cfg, item)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict:
    """A JSON/YAML-safe nested dict (tuples become lists); load_config reads it back equal."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (normally RUN_DIR/config.yaml)."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, default_flow_style=None)


def resolve_path(p: str) -> str:
    """Absolute path of ``p``: as given / from the cwd first, then under the repo root, then
    inside the installed package (``ds_configs/zero3.json`` after a non-editable install)."""
    expanded = os.path.expanduser(p)
    if os.path.exists(expanded):
        return os.path.abspath(expanded)
    if not os.path.isabs(expanded):
        for root in (PACKAGE_ROOT, PACKAGE_DIR):
            candidate = root / expanded
            if candidate.exists():
                return str(candidate)
    return p
