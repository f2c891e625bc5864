"""Every shipped config file loads, and every section types against its stage's settings."""

from pathlib import Path

import pytest

from emojax.run.config import load_run_file
from emojax.config_loader import SECTIONS
from emojax.run.stages import Train, Context

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "demo.yaml", "llama-3.1-8b-gpu.yaml", "gemma-2-2b-tpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_types(path):
    run_file = load_run_file(path)
    for name in SECTIONS:
        if name not in ("run", "train"):
            run_file.config(name)
    Train()._config(Context(run_file=run_file, run_dir=Path(".")))
