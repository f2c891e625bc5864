"""Config values are never coerced silently, every number is range-checked, and conflicting settings are named."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import types
import typing

import pytest

import emojax
from emojax.concepts.config import FitConfig
from emojax.config_loader import SECTIONS, build, field_range, load_section, parse_overrides
from emojax.corpus.config import CorpusConfig
from emojax.errors import CheckpointError, ConfigError
from emojax.models.config import ModelConfig, RopeConfig
from emojax.models.hf_config import config_from_hf_dict
from emojax.run.config import load_run_file
from emojax.sae.config import SaeConfig
from emojax.store.config import DumpConfig
from emojax.train.config import TrainConfig


def _corpus(tmp_path, text: str) -> CorpusConfig:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_section(CorpusConfig, path)


# ---- no silent coercion


def test_int_field_refuses_a_fraction(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: corpus\.n_shards must be a whole number, got 2\.7"):
        _corpus(tmp_path, "corpus:\n  n_shards: 2.7\n")
    with pytest.raises(ConfigError, match=r"overrides: corpus\.n_shards must be a whole number"):
        load_section(CorpusConfig, overrides=["n_shards=2.7"])


def test_int_field_takes_whole_floats_and_exponents():
    config = load_section(SaeConfig, overrides=["n_latents=4096.0", "dead_after_tokens=1e6"])
    assert (config.n_latents, config.dead_after_tokens) == (4096, 1_000_000)
    assert type(config.n_latents) is int and type(config.dead_after_tokens) is int


def test_bool_is_no_number():
    with pytest.raises(ConfigError, match=r"corpus\.n_shards must be a number, got True"):
        load_section(CorpusConfig, overrides=["n_shards=true"])


def test_float_field_takes_ints_and_yaml11_exponents(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  lr: 5e-3\n  rope_theta: 500000\n")  # YAML 1.1 reads 5e-3 as a string
    config = load_section(TrainConfig, path)
    assert config.lr == 0.005 and config.rope_theta == 500_000.0 and type(config.rope_theta) is float


def test_empty_value_for_a_text_field_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: corpus\.out is empty"):
        _corpus(tmp_path, "corpus:\n  out:\n")
    with pytest.raises(ConfigError, match=r"corpus\.reader\.text_column is empty"):
        _corpus(tmp_path, "corpus:\n  reader:\n    text_column:\n")
    assert _corpus(tmp_path, "corpus:\n  labels_file:\n").labels_file is None  # an optional one may be empty


def test_text_field_takes_numbers_as_written(tmp_path):
    # YAML 1.1 reads 0123 as octal 83, 1_000 as 1000 and 1.10 as 1.1: a text setting keeps what was written.
    config = _corpus(tmp_path, "corpus:\n  out: 0123\n  tokenizer: 1.10\n  extra_labels: [1_000, x]\n")
    assert (config.out, config.tokenizer, config.extra_labels) == ("0123", "1.10", ("1_000", "x"))
    assert load_section(CorpusConfig, overrides=["out=007"]).out == "007"


def test_bool_for_a_text_field_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"corpus\.tokenizer must be text, got True; quote it"):
        _corpus(tmp_path, "corpus:\n  tokenizer: yes\n")


def test_duplicate_yaml_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML \(line 3, column 3: found the key 'n_shards' twi"):
        _corpus(tmp_path, "corpus:\n  n_shards: 2\n  n_shards: 4\n")


# ---- ranges


@pytest.mark.parametrize("cls, section, override, message", [
    (CorpusConfig, "corpus", "pack_length=-1", r"corpus\.pack_length=-1 is out of range: it must be >= 0"),
    (CorpusConfig, "corpus", "max_tokens=0", r"corpus\.max_tokens=0 is out of range: it must be > 0"),
    (CorpusConfig, "corpus", "test_fraction=1.5", r"corpus\.test_fraction=1\.5 is out of range: it must be in \[0, 1"),
    (CorpusConfig, "corpus", "generator.n_topics=0", r"corpus\.generator\.n_topics=0 is out of range"),
    (DumpConfig, "dump", "layers=[1,-2]", r"dump\.layers\[1\]=-2 is out of range: it must be >= 0"),
    (SaeConfig, "sae", "lr=0", r"sae\.lr=0\.0 is out of range: it must be > 0"),
    (SaeConfig, "sae", "lr=.nan", r"sae\.lr must be a finite number"),
    (FitConfig, "fit", "denoise_variance=1", r"fit\.denoise_variance=1\.0 is out of range: it must be in \(0, 1\)"),
])
def test_out_of_range_names_key_value_and_range(cls, section, override, message):
    with pytest.raises(ConfigError, match=r"defaults \+ overrides: " + message):
        load_section(cls, overrides=[override])


def test_train_ranges():
    with pytest.raises(ConfigError, match=r"train\.vocab_size=100 is out of range: it must be >= 259"):
        load_section(TrainConfig, overrides=["preset=tiny", "vocab_size=100"])
    with pytest.raises(ValueError, match="n_heads=0 must be > 0"):  # not a ZeroDivisionError
        TrainConfig(n_heads=0)
    with pytest.raises(ValueError, match="n_kv_heads=0 must be > 0"):
        ModelConfig(architecture="llama", vocab_size=7, d_model=8, n_layers=1, n_heads=2, n_kv_heads=0, head_dim=4,
                    d_mlp=8)


def _config_classes() -> list[type]:
    """Every dataclass of every emojax `config` module, each stage section's class, and the dataclasses nested in
    their fields: a config class added later is walked without being listed here."""
    found: list[type] = [section.cls for section in SECTIONS.values()]
    for info in pkgutil.walk_packages(emojax.__path__, "emojax."):
        if info.name.rsplit(".", 1)[-1] == "config":
            module = importlib.import_module(info.name)
            found += [v for v in vars(module).values()
                      if dataclasses.is_dataclass(v) and isinstance(v, type) and v.__module__ == module.__name__]
    seen: list[type] = []
    while found:
        cls = found.pop()
        if cls in seen:
            continue
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            found += [t for t in _leaves(hints[f.name]) if dataclasses.is_dataclass(t)]
    return sorted(seen, key=lambda c: c.__name__)


def _leaves(hint) -> list:
    """The types a hint is made of: int | None -> [int], tuple[float, ...] -> [float]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple):
        return [leaf for arg in typing.get_args(hint) if arg is not Ellipsis for leaf in _leaves(arg)]
    return [hint]


CLASSES = _config_classes()


def test_the_walk_finds_the_config_classes():
    names = {c.__name__ for c in CLASSES}
    assert names >= {"CorpusConfig", "GeneratorConfig", "ReaderSpec", "DumpConfig", "FitConfig", "SaeConfig",
                     "TrainConfig", "RunSection", "SteerSettings", "ModelConfig", "RopeConfig"}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_number_declares_a_range(cls):
    hints = typing.get_type_hints(cls)
    missing, outside = [], []
    for f in dataclasses.fields(cls):
        if not {int, float} & set(_leaves(hints[f.name])):
            continue
        rng = field_range(f)
        if rng is None:
            missing.append(f.name)
        elif f.default is not dataclasses.MISSING and f.default is not None:
            values = f.default if isinstance(f.default, tuple) else (f.default,)
            outside += [f"{f.name}={f.default!r} not {rng}" for v in values if v not in rng][:1]
    assert not missing, f"{cls.__name__}: declare a range (config_loader.positive/ranged/...) for {missing}"
    assert not outside, f"{cls.__name__}: defaults outside their declared range: {outside}"


def test_build_enforces_the_declared_range_of_every_class():
    # One field per class is enough to show build reads the metadata (the walk above shows it is declared).
    for cls in (CorpusConfig, DumpConfig, FitConfig, SaeConfig, TrainConfig):
        name = next(f.name for f in dataclasses.fields(cls)
                    if field_range(f) and field_range(f).lo is not None and not isinstance(f.default, tuple))
        with pytest.raises(ConfigError, match=rf"x\.{name}=.* is out of range"):
            build(cls, {name: -10**9}, "test", prefix="x.")


# ---- conflicting overrides and misplaced scalars


@pytest.mark.parametrize("items", [["a=1", "a.b=2"], ["a.b=2", "a=1"], ["a.b.c=1", "a.b=[2]"]])
def test_key_and_key_inside_it_conflict(items):
    with pytest.raises(ConfigError, match=re.escape(f"overrides {items[0]!r} and {items[1]!r} conflict")):
        parse_overrides(items)


def test_same_key_twice():
    with pytest.raises(ConfigError, match=r"overrides 'a\.b=1' and 'a\.b=2' both set a\.b; keep one"):
        parse_overrides(["a.b=1", "a.b=2"])
    assert parse_overrides(["a.b=1", "a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}  # the same value twice is fine


def test_conflicting_overrides_through_a_loader():
    with pytest.raises(ConfigError, match=r"'reader\.format=csv' and 'reader=csv' conflict"):
        load_section(CorpusConfig, overrides=["reader.format=csv", "reader=csv"])


@pytest.mark.parametrize("text", ["corpus: 5\n", "corpus: [1, 2]\n", "corpus: text\n"])
def test_scalar_section_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match=r"c\.yaml: section 'corpus' must be a mapping"):
        _corpus(tmp_path, text)


def test_scalar_section_is_an_error_in_every_loader(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: 3\ncorpus: 0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: section 'train' must be a mapping"):
        load_section(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"run\.yaml: section 'corpus' must be a mapping"):
        load_section(CorpusConfig, path, overrides=["n_shards=2"])
    with pytest.raises(ConfigError, match=r"run\.yaml \+ overrides: corpus is a mapping .* single value 0"):
        load_run_file(path, overrides=["corpus.n_shards=2"])
    path.write_text("corpus:\n  generator: 5\n")
    with pytest.raises(ConfigError, match=r"corpus\.generator must be a mapping of settings, got 5"):
        load_section(CorpusConfig, path)


# ---- config.json read from dicts (the file-level cases live in test_load_errors.py)


def test_gpt2_embedding_not_divisible_by_heads():
    raw = {"model_type": "gpt2", "vocab_size": 50, "n_embd": 30, "n_layer": 2, "n_head": 4, "n_positions": 16}
    with pytest.raises(CheckpointError, match=r"x/config\.json: n_embd=30 is not divisible by n_head=4"):
        config_from_hf_dict(raw, source="x/config.json")


def test_llama3_rope_factors_must_be_ordered():
    raw = {"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 8,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                               "high_freq_factor": 4.0}}
    with pytest.raises(CheckpointError, match=r"rope_parameters\.high_freq_factor=4\.0 must be above"):
        config_from_hf_dict(raw, source="x/config.json")
    with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor"):
        RopeConfig(kind="llama3", low_freq_factor=4.0, high_freq_factor=4.0)
