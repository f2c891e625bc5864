"""Every shipped config file loads, and every section types against its stage's settings."""

from pathlib import Path

import pytest

from emojax.run.config import load_run_file
from emojax.run.stages import SECTION_CLASSES, Train, Context, typed_section

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "demo.yaml", "llama-3.1-8b-gpu.yaml", "gemma-2-2b-tpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_types(path):
    import importlib

    run_file = load_run_file(path)
    for name, (target, forced) in SECTION_CLASSES.items():
        module, cls = target.split(":")
        typed_section(getattr(importlib.import_module(module), cls), run_file, name, forced)
    Train()._config(Context(run_file=run_file, run_dir=Path(".")))
