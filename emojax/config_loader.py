"""Typed configs from YAML plus key=value overrides.

Config classes are frozen dataclasses with their defaults defined once; a YAML file (one section per stage,
e.g. `corpus:`) and `key=value` overrides change only what differs. Unknown keys are errors naming the key
and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from emojax.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def parse_overrides(overrides: Sequence[str], source: str = "command line") -> dict:
    """["a.b=3", "c=x"] -> {"a": {"b": 3}, "c": "x"}; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: override {item!r} is not key=value")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value else ""
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type[T], values: dict, source: str, prefix: str = "") -> T:
    """Builds dataclass `cls` from a (nested) dict; unknown keys and wrong types name the key and source."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {[prefix + k for k in unknown]}; "
                          f"{cls.__name__} has {sorted(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, source, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _convert(hint, value, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping")
        return build(hint, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, source, key) if len(args) == 1 else value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_convert(item, v, source, key) for v in value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return hint(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        return str(value)
    return value


def load_section(cls: type[T], section: str, config_file: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> T:
    """The `section` of a YAML config file (or defaults), with key=value overrides applied."""
    values: dict = {}
    source = "defaults"
    if config_file is not None:
        data = read_yaml(config_file)
        source = str(config_file)
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{config_file}: section {section!r} must be a mapping")
    if overrides:
        values = merge(values, parse_overrides(overrides))
        source += " + overrides"
    return build(cls, values, source, prefix=f"{section}.")
