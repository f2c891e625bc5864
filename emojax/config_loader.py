"""Typed configs from YAML plus key=value overrides.

Config classes are frozen dataclasses with their defaults defined once; a YAML file (one section per stage,
e.g. `corpus:`) and `key=value` overrides change only what differs. Unknown keys are errors naming the key
and the file. Each class registers itself as a section where it lives (`@config_section("corpus", ...)`), and
every reader (a stage command's `load_section`, `emojax run`'s run file) types sections through that registry.

Nothing is coerced silently: an int setting refuses 2.7, a text setting refuses an empty value (YAML null),
and every number is checked against the range its field declares (`positive(8)`, `fraction(0.1)`, ...), with
an error naming the key, the value and the range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from emojax.errors import ConfigError

T = TypeVar("T")


# ---- ranges declared on config fields


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: lo..hi (None: open end); *_open excludes the bound itself."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))

    def __str__(self) -> str:
        if self.lo is None and self.hi is None:
            return "any finite number"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


_REQUIRED: Any = dataclasses.MISSING


def ranged(default=_REQUIRED, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False):
    """A dataclass field whose number (or every number of its tuple) must lie in the range; `build` checks it.

    No default: a required field."""
    return dataclasses.field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open)})


def positive(default=_REQUIRED):
    """> 0 (for an int: >= 1)."""
    return ranged(default, 0, lo_open=True)


def non_negative(default=_REQUIRED):
    return ranged(default, 0)


def fraction(default=_REQUIRED):
    """A share in [0, 1]."""
    return ranged(default, 0, 1)


def unbounded(default=_REQUIRED):
    """Any finite number: declared explicitly, so that a forgotten range is told apart from a chosen one."""
    return ranged(default)


def field_range(field: dataclasses.Field) -> Range | None:
    return field.metadata.get("range")


def range_violations(obj) -> list[str]:
    """'name=value must be RANGE' for each number of dataclass `obj` outside its field's declared range."""
    problems = []
    for f in dataclasses.fields(obj):
        rng, value = field_range(f), getattr(obj, f.name)
        if rng is None or value is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if v not in rng:
                problems.append(f"{f.name}={value!r} must be {rng}")
                break
    return problems


# ---- YAML that remembers how numbers were written


class _Int(int):
    """An int read from YAML with its text: a text setting given `0123` or `1_000` gets exactly that."""

    text: str


class _Float(float):
    text: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps the written text of numbers and refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice (the second would "
                    "silently win); keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _with_text(cls, construct):
    def construct_with_text(loader, node):
        value = cls(construct(loader, node))
        value.text = node.value
        return value
    return construct_with_text


_Loader.add_constructor("tag:yaml.org,2002:int", _with_text(_Int, yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _with_text(_Float, yaml.SafeLoader.construct_yaml_float))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message spans several lines with a source excerpt)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml(path: str | Path) -> dict:
    try:
        data = _load_yaml(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a config file is YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def file_section(data: dict, section: str, source: str) -> dict:
    """Section `section` of a read YAML file: absent or empty is {}; a scalar or list is an error."""
    values = data.get(section)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping of settings (key: value lines), "
                          f"got {values!r}")
    return values


# ---- overrides and merging


def parse_overrides(overrides: Sequence[str], source: str = "command line") -> dict:
    """["a.b=3", "c=x"] -> {"a": {"b": 3}, "c": "x"}; values are parsed as YAML scalars/lists.

    Two overrides of one key with different values, or of a key and a key inside it (`a=1 a.b=2`), are an
    error naming both: which one should win is not ours to guess.
    """
    tree: dict = {}
    seen: dict[tuple[str, ...], tuple[str, Any]] = {}  # key path -> (override, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        path = tuple(key.split("."))
        if not sep or not key or not all(path):
            raise ConfigError(f"{source}: override {item!r} is not key=value (key: names joined by dots)")
        try:
            value = _load_yaml(text) if text else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: override {item!r}: not valid YAML ({_yaml_problem(e)})") from None
        for other_path, (other, other_value) in seen.items():
            if other_path == path:
                if other_value != value:
                    raise ConfigError(f"{source}: overrides {other!r} and {item!r} both set {key}; keep one")
            elif path[:len(other_path)] == other_path or other_path[:len(path)] == path:
                outer, inner = sorted((other_path, path), key=len)
                raise ConfigError(f"{source}: overrides {other!r} and {item!r} conflict: {'.'.join(outer)} would "
                                  f"be both one value and a mapping holding {'.'.join(inner)}; keep one")
        seen[path] = (item, value)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def merge(base: dict, update: dict, source: str = "", prefix: str = "") -> dict:
    """`base` with `update` on top, mapping by mapping; a mapping meeting a single value is an error (naming
    `source`, the file and/or overrides, when given)."""
    out = dict(base)
    for k, v in update.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            out[k] = merge(old, v, source, f"{prefix}{k}.")
        elif old is not None and v is not None and isinstance(v, dict) != isinstance(old, dict):
            mapping, single = (old, v) if isinstance(old, dict) else (v, old)
            raise ConfigError(f"{source + ': ' if source else ''}{prefix}{k} is a mapping of settings "
                              f"({sorted(map(str, mapping))}) in one place and the single value {single!r} in the "
                              "other; it must be a mapping")
        else:
            out[k] = v
    return out


# ---- typing a dict into a dataclass


def build(cls: type[T], values: dict, source: str, prefix: str = "") -> T:
    """Builds dataclass `cls` from a (nested) dict; unknown keys, wrong types and out-of-range numbers name the
    key and the source."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__} must be a mapping of settings, "
                          f"got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {[prefix + k for k in unknown]}; "
                          f"{cls.__name__} has {sorted(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, source, prefix + name, field_range(fields[name]))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _convert(hint, value, source: str, key: str, rng: Range | None = None) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping of settings, got {value!r}")
        return build(hint, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, source, key, rng) if len(args) == 1 else value
    if value is None:
        raise ConfigError(f"{source}: {key} is empty (in YAML `{key.rsplit('.', 1)[-1]}:` with nothing after it "
                          "is null); give it a value, or remove the line to keep the default")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_convert(item, v, source, f"{key}[{i}]", rng) for i, v in enumerate(value))
    if hint in (int, float):
        number = _number(hint, value, source, key)
        if rng is not None and number not in rng:
            raise ConfigError(f"{source}: {key}={number!r} is out of range: it must be {rng}")
        return number
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is str:
        return _text(value, source, key)
    return value


def _number(hint: type, value, source: str, key: str) -> int | float:
    """`value` as an int or float; never rounds (2.7 is no int) and never reads a bool as a number."""
    number = value
    if isinstance(value, str):
        try:  # YAML 1.1 reads 5e-3 and 1e6 (no dot) as strings
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    if hint is float:
        return float(number)
    if isinstance(number, float):
        if not number.is_integer():
            raise ConfigError(f"{source}: {key} must be a whole number, got {value!r}")
        return int(number)
    return int(number)


def _text(value, source: str, key: str) -> str:
    """A text setting. A number is taken as written (`out: 0123` is "0123", not YAML 1.1's octal 83); a bool
    or a list is an error, since yes/no/on/off would otherwise turn into "True"/"False"."""
    if isinstance(value, str):
        return value
    if isinstance(value, (_Int, _Float)):
        return value.text
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{source}: {key} must be text, got {value!r}; quote it, e.g. {key.rsplit('.', 1)[-1]}: "
                      f"\"{value}\"")


# ---- the sections of a config file


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of a config file: its name, the class its mapping is built into, the keys `emojax run` derives
    itself ({key: what it is, for printouts}), and `base`, an optional hook giving the values under the file's
    (the train section's `preset: NAME`)."""

    name: str
    cls: type
    derived: dict[str, str]
    base: Callable[[dict, str], dict] | None = None

    def build(self, values: dict, source: str):
        """The typed config of a parsed mapping (the file's section with overrides merged)."""
        if self.base is not None:
            values = self.base(values, source)
        return build(self.cls, values, source, prefix=f"{self.name}.")


SECTIONS: dict[str, Section] = {}  # name -> section, filled by @config_section where each class lives


def config_section(name: str, derived: dict[str, str] | None = None,
                   base: Callable[[dict, str], dict] | None = None):
    """Class decorator: registers a frozen dataclass as section `name` of config files."""
    def register(cls):
        SECTIONS[name] = Section(name, cls, dict(derived or {}), base)
        return cls
    return register


def section_of(cls: type) -> Section:
    for section in SECTIONS.values():
        if section.cls is cls:
            return section
    raise LookupError(f"{cls.__name__} is not registered as a config section (@config_section)")


def load_section(cls: type[T], config_file: str | Path | None = None, overrides: Sequence[str] | dict = ()) -> T:
    """The section `cls` is registered for, from a YAML config file (or defaults), with overrides applied:
    KEY=VALUE strings, or the mapping parse_overrides made of them."""
    section = section_of(cls)
    values: dict = {}
    source = "defaults"
    if config_file is not None:
        source = str(config_file)
        values = file_section(read_yaml(config_file), section.name, source)
    if overrides:
        source += " + overrides"
        values = merge(values, overrides if isinstance(overrides, dict) else parse_overrides(overrides), source)
    return section.build(values, source)
