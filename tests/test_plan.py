"""`emojax plan`: every shipped config planned without running anything heavy, through the library function and
the command; the numbers follow their documented formulas, and settings that cannot fit are named."""

import argparse
import json
from pathlib import Path

import pytest
from test_abstract import PUBLISHED

from emojax.corpus.generator import generate
from emojax.errors import ConfigError
from emojax.models.hf_config import config_to_hf_dict
from emojax.models.presets import SHAPES
from emojax.run.config import load_run_file
from emojax.run.plan import cmd_plan, plan_job, register
from emojax.run.stages import STAGES, Context

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
SECTIONS = ("model", "dump", "corpus", "store", "sae", "time", "warnings", "notes")
ESTIMATED = ("dump", "sae", "steer")  # the stages with a benchmark figure
LLAMA = next(p for p in CONFIGS if p.name == "llama-3.1-8b-gpu.yaml")


def _cli(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["plan", *map(str, argv)])


def _check_plan(plan: dict, config: Path) -> None:
    assert set(SECTIONS) <= set(plan)
    m, d, c, st, s = plan["model"], plan["dump"], plan["corpus"], plan["store"], plan["sae"]
    for value in (m["parameters"], d["parameter_bytes_per_device"], d["activation_bytes_per_device"],
                  c["documents"], c["tokens"], st["bytes_per_layer"], st["total_bytes"],
                  s["parameter_bytes_per_device"], s["optimizer_bytes_per_device"], s["total_bytes_per_device"]):
        assert value > 0
    assert m["family"] and m["dtype"] in ("float32", "bfloat16")
    # The store's documented formula: per layer, token activations in dump.dtype plus float32 pooled means.
    width = {"bfloat16": 2, "float32": 4}[st["dtype"]]
    per_layer = c["tokens"] * m["d_model"] * width + c["documents"] * m["d_model"] * 4
    assert st["bytes_per_layer"] == per_layer
    assert st["total_bytes"] == per_layer * len(st["layers"]) + c["tokens"] * 4
    run_file = load_run_file(config)
    assert list(plan["time"]) == list(run_file.run.stages)
    for name in ESTIMATED:
        if name in plan["time"]:
            t = plan["time"][name]
            assert t["seconds"] > 0 and t["label"].startswith("estimate (from PERFORMANCE.md"), t
    for t in plan["time"].values():  # a number is never shown without saying what it is
        assert t["label"].startswith(("estimate", "not estimated", "nothing to train"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_planned_by_the_library_and_the_command(config, capsys):
    plan = plan_job(config)
    _check_plan(plan, config)
    assert cmd_plan(_cli("--config", config, "--device", "h100", "--json")) == 0
    from_cli = json.loads(capsys.readouterr().out)
    _check_plan(from_cli, config)
    assert from_cli["device"]["kind"] == "h100"
    assert from_cli["corpus"] == plan["corpus"]  # the device changes memory and time, not the job
    assert cmd_plan(_cli("--config", config)) == 0
    text = capsys.readouterr().out
    for title in ("model", "dump", "corpus", "store", "sae", "time per stage"):
        assert f"\n{title}\n" in text
    assert "estimate (from" in text


@pytest.mark.parametrize("config", [p for p in CONFIGS if p.stem.rsplit("-", 1)[0] in PUBLISHED], ids=lambda p: p.name)
def test_a_cluster_config_without_its_checkpoint_takes_the_preset_named_by_its_file_and_says_so(config):
    preset = config.stem.rsplit("-", 1)[0]
    plan = plan_job(config)
    assert abs(plan["model"]["parameters"] - PUBLISHED[preset]) / PUBLISHED[preset] < 1e-3
    assert plan["model"]["family"] == SHAPES[preset].architecture
    assert any(f"not found here; shape from preset {preset}" in n for n in plan["notes"])


def test_the_generator_document_count_is_exact():
    plan = plan_job(next(p for p in CONFIGS if p.name == "tiny.yaml"))
    ctx = Context(run_file=load_run_file(next(p for p in CONFIGS if p.name == "tiny.yaml")), run_dir=Path("."))
    generated = sum(1 for _ in generate(STAGES["corpus"]._config(ctx).generator))
    assert plan["corpus"]["documents"] == generated
    assert 0 < plan["corpus"]["mean_tokens_per_document"] <= plan["corpus"]["max_tokens"]


def test_the_world_corpus_count_is_its_work_list():
    from emojax.pipelines.corpus import generator_work

    demo = next(p for p in CONFIGS if p.name == "demo.yaml")
    plan = plan_job(demo)
    ctx = Context(run_file=load_run_file(demo), run_dir=Path("."))
    assert plan["corpus"]["documents"] == len(generator_work(STAGES["corpus"]._config(ctx)))
    assert plan["corpus"]["documents_by_kind"] == {"story": 171 * 20, "neutral": 300, "implicit": 171 * 5}
    assert 100 < plan["corpus"]["mean_tokens_per_document"] <= plan["corpus"]["max_tokens"]


@pytest.mark.parametrize(("device", "overrides", "key"), [
    ("tpu-v5e", ["dump.mesh=[1,1,1]", "dump.model_dtype=float32"], "dump.mesh"),  # 32 GB of weights on 16 GiB
    ("a100-40gb", ["dump.mesh=[1,1,1]", "dump.tokens_per_batch=1048576"], "dump.tokens_per_batch"),
    ("h100", ["sae.n_latents=4194304"], "sae.mesh"),  # 4M latents: 128 GiB of SAE state per device
    ("h100", ["sae.batch_size=2097152"], "sae.batch_size"),
    ("cpu", [], "dump.mesh"),  # [1, 2, 4] needs 8 devices; a CPU process has 1
    ("h100", ["corpus.max_tokens=200000"], "corpus.max_tokens"),
    ("h100", ["sae.layer=30"], "sae.layer"),
])
def test_a_setting_that_cannot_fit_is_warned_about_by_its_key(device, overrides, key):
    plan = plan_job(LLAMA, overrides, device=device)
    keys = [w["key"] for w in plan["warnings"]]
    assert key in keys, plan["warnings"]
    assert all(w["message"] for w in plan["warnings"])


def test_the_shipped_cluster_configs_fit_their_devices():
    assert plan_job(LLAMA, device="h100")["warnings"] == []
    gemma = next(p for p in CONFIGS if p.name == "gemma-2-2b-tpu.yaml")
    assert plan_job(gemma, device="tpu-v4")["warnings"] == []


def test_sharding_divides_the_parameters_over_fsdp_and_tensor():
    whole = plan_job(LLAMA, ["dump.mesh=[1,1,1]"], device="h100")["dump"]["parameter_bytes_per_device"]
    split = plan_job(LLAMA, ["dump.mesh=[1,2,4]"], device="h100")["dump"]["parameter_bytes_per_device"]
    assert whole == PUBLISHED["llama-3.1-8b"] * 2  # bfloat16, nothing split
    assert whole / 8 <= split < whole / 7  # norms are replicated; the rest is split 8 ways


def test_a_missing_model_folder_without_a_preset_name_asks_for_model_shape(tmp_path):
    config = tmp_path / "my-job.yaml"
    config.write_text("run:\n  model: /nowhere/checkpoint\n  dir: runs/x\n")
    with pytest.raises(ConfigError, match=r"run.model='/nowhere/checkpoint'.*--model-shape"):
        plan_job(config)
    plan = plan_job(config, model_shape="gpt2")
    assert plan["model"]["family"] == "gpt2" and "--model-shape" in plan["model"]["shape_from"]


def test_a_checkpoint_folder_here_is_read_from_its_config_json(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_hf_dict(SHAPES["tiny"])))
    config = tmp_path / "job.yaml"
    config.write_text(f"run:\n  model: {folder}\n  dir: {tmp_path / 'run'}\ndump:\n  layers: [1, 2]\n"
                      "sae:\n  layer: 2\n  n_latents: 128\n  k: 8\n")
    plan = plan_job(config)
    assert plan["model"]["shape_from"].endswith("config.json")
    assert plan["model"]["d_model"] == SHAPES["tiny"].d_model
    assert plan["model"]["tokenizer"] == "byte"  # no tokenizer.json: the corpus stage uses bytes
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_input_files_are_counted(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} " * 20, "label": "calm"}) + "\n" for i in range(37)))
    config = tmp_path / "in.yaml"
    config.write_text(f"run:\n  model: random:tiny\ncorpus:\n  inputs: ['{tmp_path}/*.jsonl']\n")
    corpus = plan_job(config)["corpus"]
    assert corpus["documents"] == 37 and corpus["tokens"] > 0 and "counted" in corpus["how"]


def test_an_unknown_device_kind_is_refused_with_the_kinds():
    with pytest.raises(ConfigError, match=r"--device 'tpu-v9'.*h100"):
        plan_job(LLAMA, device="tpu-v9")
