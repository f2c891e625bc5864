"""Every shipped config file loads, and every section types against its stage's settings."""

from pathlib import Path

import pytest

from emojax.run.config import load_run_file
from emojax.config_loader import SECTIONS
from emojax.run.stages import Train, Context

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
WORLD_SMALL = Path(__file__).resolve().parents[1] / "configs" / "world" / "small.yaml"


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "demo.yaml", "llama-3.1-8b-gpu.yaml", "gemma-2-2b-tpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_types(path):
    run_file = load_run_file(path)
    for name in SECTIONS:
        if name not in ("run", "train"):
            run_file.config(name)
    Train()._config(Context(run_file=run_file, run_dir=Path(".")))


def test_the_small_world_config_trains_and_measures_one_world():
    """configs/world/small.yaml: its model's world and its corpus's share the split, the style and the 12 emotions
    (check_run_file refuses a difference), and the corpus writes fit stories of those 12 only."""
    from emojax.pipelines.corpus import generator_work
    from emojax.run.stages import STAGES, check_run_file

    run_file = load_run_file(WORLD_SMALL)
    check_run_file(run_file)
    train = Train()._config(Context(run_file=run_file, run_dir=Path(".")))
    corpus = STAGES["corpus"]._config(Context(run_file=run_file, run_dir=Path(".")))
    names = train.world.concept_names()
    assert len(names) == 12 and names == corpus.generator.world.concept_names()
    emotions = {item[2] for item in generator_work(corpus) if item[0] == "world-fit"}
    assert emotions == set(range(12))


REGULATION = sorted((Path(__file__).resolve().parents[1] / "configs" / "regulation").glob("*.yaml"))


@pytest.mark.parametrize("path", REGULATION, ids=lambda p: p.name)
def test_regulation_configs_load_whole(path):
    """scripts/regulation.py's configs: the world's (a run) and a user's checkpoints (models, bank, prompts, out)."""
    from emojax.config_loader import load_section
    from emojax.experiment.config import RegulationConfig

    config = load_section(RegulationConfig, path)
    config.check_mode(str(path))
    assert config.run or [name for name, _ in config.named_models()] == ["base", "suppressed"]


def test_regulation_config_names_what_is_wrong(tmp_path):
    from emojax.config_loader import load_section
    from emojax.errors import ConfigError
    from emojax.experiment.config import RegulationConfig

    assert {p.name for p in REGULATION} == {"world.yaml", "checkpoints.yaml"}
    with pytest.raises(ConfigError, match=r"regulation.models: 'base' is not NAME=CHECKPOINT"):
        load_section(RegulationConfig, None, ["models=[base]"])
    with pytest.raises(ConfigError, match="regulation.models repeats a name"):
        load_section(RegulationConfig, None, ["models=[a=x,a=y]"])
    config = load_section(RegulationConfig, None, ["models=[a=x]", "bank=b"])
    with pytest.raises(ConfigError, match="cli: give regulation.run .* missing: prompts, out"):
        config.check_mode("cli")
    both = load_section(RegulationConfig, None, ["models=[a=x]", "run=runs/demo"])
    with pytest.raises(ConfigError, match="models belong to the checkpoints mode"):
        both.check_mode("cli")
    run_with_prompts = load_section(RegulationConfig, None, ["run=runs/demo", "prompts=p.jsonl", "cues=true"])
    with pytest.raises(ConfigError, match="prompts, cues belong to the checkpoints mode"):
        run_with_prompts.check_mode("cli")
    checkpoints_with_epochs = load_section(RegulationConfig, None, ["models=[a=x]", "bank=b", "prompts=p", "out=o",
                                                                    "epochs=5"])
    with pytest.raises(ConfigError, match="epochs set how regulation.run .* would be ignored"):
        checkpoints_with_epochs.check_mode("cli")
    with pytest.raises(ConfigError, match=r"r.yaml.*regulation.models repeats a name"):
        (tmp_path / "r.yaml").write_text("regulation:\n  models: [a=x, a=y]\n")
        load_section(RegulationConfig, tmp_path / "r.yaml")
    bad = tmp_path / "r.yaml"
    bad.write_text("regulation:\n  concepts: [desperate]\n")
    with pytest.raises(ConfigError, match="concepts"):
        load_section(RegulationConfig, bad)
