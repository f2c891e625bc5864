"""Every config in configs/ run stage by stage exactly as its header documents it: the outputs land under run.dir,
where `emojax run` puts them, and the store, the bank and the SAEs name the checkpoint that was given.

The header's commands are executed as written, with three substitutions a laptop needs: the model folder is a tiny
random checkpoint of the same family, cluster-only flags (Beam's runner options, --distributed) are dropped so
Beam's DirectRunner and one process are used, and sizes are shrunk by KEY=VALUE overrides on each command.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from dump_helpers import REPO

from emojax.cli import main
from emojax.models import random_model
from emojax.models.identity import model_identity
from emojax.models.presets import SHAPES

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SHRINK = {
    "corpus": ["generator.concepts=[desperate,calm,afraid,joyful]", "generator.n_topics=3",
               "generator.stories_per_topic=2", "n_shards=2", "max_tokens=48"],
    "corpus/world": ["generator.concepts=[desperate,calm,afraid,joyful]", "generator.stories_per_emotion=[3,1,1]",
                     "generator.implicit_per_emotion=1", "generator.suite_scenarios=4", "n_shards=2",
                     "max_tokens=48"],
    "dump": ["layers=[1,2]", "dtype=float32", "model_dtype=float32", "mesh=[1,1,1]", "buckets=[24,48]",
             "tokens_per_batch=1024", "token_chunk_rows=1024", "token_read_rows=256", "doc_chunk_rows=64",
             "doc_read_rows=16"],
    "fit": ["mesh=[1,1,1]", "kmeans_k=2", "probe_epochs=5", "layers=[]"],
    "sae": ["layer=2", "n_latents=64", "k=4", "batch_size=128", "steps=6", "mesh=[1,1]", "checkpoint_every=3",
            "init_sample_tokens=512", "buffer_chunks=2", "lr_warmup_steps=2"],
}
CLUSTER_FLAGS = re.compile(r"--(runner|flink_master|environment_type|project|region|temp_location|extra_package)=|"
                           r"--distributed$")


def documented_commands(config) -> list[list[str]]:
    """The per-stage `emojax ...` commands of a config's header comment (continuation lines joined)."""
    lines, commands, current = config.read_text().splitlines(), [], ""
    for line in lines:
        if not line.startswith("#"):
            break
        text = line[1:].split("  #")[0].strip()
        if current:
            current += " " + text
        elif text.startswith("emojax "):
            current = text
        if current and not current.endswith("\\"):
            commands.append(shlex.split(current.replace("\\", " ")))
            current = ""
        elif current:
            current = current[:-1]
    return [c for c in commands if c[1] != "run"]


def tiny_checkpoint_like(config, folder):
    """A tiny random checkpoint of the config's model family (Gemma 2 written by transformers, or Llama)."""
    if "gemma" in config.name:
        from hf_checkpoints import build_checkpoint

        build_checkpoint(folder, "gemma2", seed=7, decisive=False, vocab_size=300, num_hidden_layers=3,
                         head_dim=16, sliding_window=16)
    else:
        random_model(SHAPES["tiny"], seed=7).save(folder)
    return folder


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_the_documented_per_stage_commands_write_under_run_dir_with_the_given_model(config, tmp_path, capsys):
    commands = documented_commands(config)
    assert [c[1] for c in commands[:2]] == ["corpus", "dump"] and {"fit", "sae"} <= {c[1] for c in commands}, commands
    checkpoint = tiny_checkpoint_like(config, tmp_path / "model")
    run_dir = tmp_path / "run"
    for command in commands:
        stage = command[1]
        args = [a if a != f"configs/{config.name}" else str(config) for a in command[1:]]
        assert str(config) in args, command
        args = [a for a in args if not CLUSTER_FLAGS.match(a)]
        kind = ((yaml.safe_load(config.read_text()).get("corpus") or {}).get("generator") or {}).get("kind")
        shrink = SHRINK[f"{stage}/world" if stage == "corpus" and kind == "world" else stage]
        args += [f"run.dir={run_dir}", f"run.model={checkpoint}", *shrink]
        assert main(args) == 0, (command, capsys.readouterr().err)
        err = capsys.readouterr().err
        assert "(run.dir on the command line)" in err, err  # it says what it resolved, and from where
        assert stage == "sae" or f"model     {checkpoint}  (run.model on the command line)" in err, err
    identity = model_identity(checkpoint)["id"]
    store = json.loads((run_dir / "activations" / "store.json").read_text())
    bank = json.loads((run_dir / "concepts" / "bank.json").read_text())
    sae = json.loads((run_dir / "sae" / "main" / "sae_0" / "cfg.json").read_text())
    assert (run_dir / "corpus" / "manifest.json").is_file()
    assert store["model_identity"]["id"] == identity
    assert store["fingerprints"]["model"] == identity
    assert bank["model_identity"]["id"] == identity
    assert sae["emojax"]["model_identity"]["id"] == identity
    assert not (REPO / "runs" / "default").exists() or not any((REPO / "runs" / "default").iterdir())


def test_a_flag_overrides_the_file_and_the_file_section_may_not_set_a_derived_path(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n  model: random:tiny\ncorpus:\n  out: elsewhere\n")
    assert main(["corpus", "build", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "corpus.out" in err and "set by `emojax run`" in err, err
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n  model: random:tiny\n")
    from emojax.run.resolve import stage_config

    resolved = stage_config("dump", config, ["layers=[1]"], flags={"out": str(tmp_path / "acts")})
    assert resolved.out == str(tmp_path / "acts") and resolved.corpus == str(tmp_path / "run" / "corpus")
    assert resolved.model == "random:tiny"
    err = capsys.readouterr().err
    assert f"output    {tmp_path / 'acts'}  (command line)" in err and "(run.model in" in err, err


def test_a_file_without_a_run_model_never_dumps_a_random_preset_silently(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")  # run.model defaults to the built-in model
    from emojax.run.resolve import stage_config
    from emojax.run.stages import STAGES

    # The built-in model is resolved through the train stage (which trains it for minutes on first use): stand in
    # a finished one.
    trained = []
    monkeypatch.setattr(STAGES["train"], "run", lambda ctx: trained.append(ctx) or {"path": str(tmp_path / "lm")})
    fit = stage_config("sae", config, [])
    assert fit.store == str(tmp_path / "run" / "activations") and len(trained) == 1
    config.write_text(f"dump:\n  corpus: {tmp_path / 'corpus'}\n  out: {tmp_path / 'acts'}\n")
    assert main(["dump", "--config", str(config)]) == 2
    assert "dump.model" in capsys.readouterr().err
