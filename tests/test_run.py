"""`emojax run` end to end on configs/tiny.yaml: every stage's artefacts, resume after a kill, bad configs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from dump_helpers import REPO, assert_same_store, run_child

from emojax.cli import main
from emojax.concepts import load_bank
from emojax.corpus.world_config import WorldConfig
from emojax.locks import holder
from emojax.run import load_run_file, run
from emojax.run.config import STAGES
from emojax.run.fingerprints import OTHER_SETTINGS, OUTPUT_SETTINGS
from emojax.steer.config import SteerSettings
from emojax.store import ActivationStore

TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One model cache for the module: the tiny built-in model is trained once."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EMOJAX_CACHE")
    os.environ["EMOJAX_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EMOJAX_CACHE")
    else:
        os.environ["EMOJAX_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_run(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    done = run(load_run_file(TINY, [f"run.dir={run_dir}"]), show_progress=False)
    return run_dir, done


def test_every_stage_writes_what_the_next_one_needs(tiny_run):
    run_dir, done = tiny_run
    run_file = load_run_file(TINY)
    assert list(done) == list(run_file.run.stages)
    assert all(r["complete"] for r in done.values())
    manifest = json.loads((run_dir / "corpus" / "manifest.json").read_text())
    concepts = run_file.section("corpus")["generator"]["concepts"]
    assert set(manifest["per_label"]) == set(concepts) | {"neutral"}
    assert manifest["rejected"] == 0
    store = ActivationStore(str(run_dir / "activations"))
    assert store.state["n_docs"] == manifest["documents_written"]
    assert store.state["n_tokens"] == manifest["tokens_written"]
    assert store.layers == (1, 2)
    bank = load_bank(run_dir / "concepts")
    assert sorted(bank.names) == sorted(concepts)
    assert bank.vectors.shape == (len(concepts), 2, store.d_model)
    assert np.isfinite(bank.vectors).all() and (bank.resid_norm > 0).all()
    report = json.loads((run_dir / "concepts" / "eval.json").read_text())
    best = report["per_layer"][str(report["best_layer"])]["test"]
    chance = 1 / len(concepts)
    assert max(best["nearest"]["top1"], best["probe"]["top1"]) > 1.5 * chance, best
    top = json.loads((run_dir / "validate" / "top_tokens.json").read_text())
    assert top["split"] == "test" and top["tokens"] > 0 and set(top["concepts"]) == set(concepts)
    assert top["layer"] == report["best_layer"] and top["summary"]["chance"] == 1.0
    curves = json.loads((run_dir / "validate" / "templates.json").read_text())
    assert curves["metric"] == "z" and len(curves["templates"]) >= 4 and curves["concepts"] == list(bank.names)
    tylenol = next(t for t in curves["templates"] if t["name"] == "tylenol_dose")
    assert [e["concept"] for e in tylenol["expected"]] == ["afraid", "calm"]  # both in the tiny run's concepts
    results = json.loads((run_dir / "experiment" / "results.json").read_text())
    assert results["suite"] == "tiny" and len(results["conditions"]) == 5
    assert results["rates"]["says_yes"]["baseline"]["n"] == 20 and results["rates"]["yes_text"]["baseline"]["n"] == 40
    html = (run_dir / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and '<section id="validation" data-status="ok">' in html
    assert '<section id="experiment" data-status="ok">' in html


def test_a_rerun_skips_every_complete_stage(tiny_run, cache, capsys):
    run_dir, _ = tiny_run
    before = (run_dir / "concepts" / "bank.safetensors").read_bytes()
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", "--quiet"]) == 0
    err = capsys.readouterr().err
    for stage in ("train", "corpus", "dump", "fit"):
        assert f"{stage}: skipped (complete, inputs unchanged)" in err
    assert (run_dir / "concepts" / "bank.safetensors").read_bytes() == before


def test_a_changed_setting_recomputes_only_what_depends_on_it_and_keeps_the_old_output(tiny_run, cache, tmp_path,
                                                                                      capsys):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], run_dir)
    before = (run_dir / "concepts" / "bank.safetensors").read_bytes()
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", "fit.kmeans_k=3", "--quiet",
                 "run.stages=[train,corpus,dump,fit]"]) == 0
    err = capsys.readouterr().err
    assert "dump: skipped (complete, inputs unchanged)" in err
    assert "fit: settings or inputs changed; recomputing" in err
    (old,) = run_dir.glob("concepts.old-*")
    assert f"was moved to {old}" in err.replace("\n", "")
    assert (old / "bank.safetensors").read_bytes() == before
    # Only the fit was in the call: a later subset run sees the SAE's input changed and moves it aside too.
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", "fit.kmeans_k=3", "--quiet",
                 "run.stages=[sae]"]) == 0
    assert "sae: settings or inputs changed; recomputing" in capsys.readouterr().err
    assert len(list(run_dir.glob("sae.old-*"))) == 1


def _hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("overrides", [
    *([f"run.stages=[{s}]"] for s in STAGES),
    ["run.stages=[dump]", "dump.verify=true"],
    ["dump.verify=true", "dump.writes_in_flight=1", "sae.log_every=7",
     "sae.checkpoint_every=11", "sae.decoder=dense", "fit.mesh=[2,1,1]", "sae.mesh=[2,1]",
     "train.checkpoint_every=13"],
], ids=[*STAGES, "verify", "no-output-settings"])
def test_a_subset_or_verify_run_of_a_finished_run_changes_no_file(tiny_run, cache, tmp_path, capsys, overrides):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], run_dir)
    before = _hashes(run_dir)
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", "--quiet", *overrides]) == 0
    err = capsys.readouterr().err
    assert "recomputing" not in err and "running" not in err, err
    assert _hashes(run_dir) == before
    if "dump.verify=true" in overrides:
        assert "dump: complete; checking its outputs" in err


def test_every_stage_setting_is_classified_as_output_or_not():
    from emojax.concepts import FitConfig
    from emojax.corpus.config import CorpusConfig
    from emojax.sae import SaeConfig
    from emojax.store import DumpConfig
    from emojax.train.config import TrainConfig

    from emojax.concepts.config import ValidateConfig
    from emojax.experiment import ExperimentConfig

    classes = {"train": TrainConfig, "corpus": CorpusConfig, "dump": DumpConfig, "fit": FitConfig, "sae": SaeConfig,
               "steer": SteerSettings, "validate": ValidateConfig, "experiment": ExperimentConfig}
    assert set(classes) == set(OUTPUT_SETTINGS) == set(OTHER_SETTINGS)
    for stage, cls in classes.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        output, other = set(OUTPUT_SETTINGS[stage]), set(OTHER_SETTINGS[stage])
        assert not output & other, (stage, output & other)
        assert fields == output | other, (stage, "unclassified:", fields - output - other,
                                          "not fields:", (output | other) - fields)
    # The built-in model's cache key (TrainConfig.fingerprint) leaves out exactly the train settings the table
    # calls output-independent, and covers every other one.
    base = TrainConfig()
    for name in OTHER_SETTINGS["train"]:
        changed = dataclasses.replace(base, **{name: "elsewhere" if name == "out" else 999})
        assert changed.fingerprint() == base.fingerprint(), name
    for name in OUTPUT_SETTINGS["train"]:
        value = getattr(base, name)
        if isinstance(value, bool):
            other = not value
        elif name == "data":
            other = "stories" if value == "world" else "world"
        elif dataclasses.is_dataclass(value):  # train.world
            other = dataclasses.replace(value, seed=value.seed + 1)
        else:
            other = (value * 2 or 1) if isinstance(value, int) else (value / 2 or 0.5)
        changed = dataclasses.replace(base, **{name: other})
        assert changed.fingerprint() != base.fingerprint(), name


def test_the_corpus_stage_fingerprint_leaves_out_an_unset_world_concepts(tmp_path):
    """A run made before world.concepts existed keeps its corpus stage's fingerprint (nothing recomputes)."""
    from emojax.run.stages import STAGES as RUN_STAGES
    from emojax.run.stages import Context

    path = tmp_path / "run.yaml"
    path.write_text("run:\n  model: random:tiny\ncorpus:\n  generator:\n    kind: world\n")
    settings = RUN_STAGES["corpus"].settings(Context(run_file=load_run_file(path), run_dir=tmp_path / "r"))
    assert "concepts" not in settings["generator"]["world"] and settings["generator"]["world"]["split_seed"] == 0
    small = load_run_file(path, ["corpus.generator.world.concepts=[happy,calm]"])
    settings = RUN_STAGES["corpus"].settings(Context(run_file=small, run_dir=tmp_path / "r"))
    assert settings["generator"]["world"]["concepts"] == ("calm", "happy")


def test_a_world_corpus_must_hold_out_what_the_world_model_held_out(tmp_path):
    from emojax.errors import ConfigError
    from emojax.run.stages import STAGES as RUN_STAGES
    from emojax.run.stages import Context, check_run_file

    path = tmp_path / "run.yaml"
    path.write_text("run:\n  model: builtin\ncorpus:\n  generator:\n    kind: world\n    world: {split_seed: 3}\n"
                    "experiment:\n  suite: world_task\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.world and corpus\.generator\.world hold out different "
                                          r"situations \(split_seed: 0 vs 3\)"):
        check_run_file(load_run_file(path))
    ctx = Context(run_file=load_run_file(path), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="hold out different situations"):  # the corpus command's path too
        RUN_STAGES["corpus"]._config(ctx)
    compact = load_run_file(path, ["train.world.split_seed=3", "train.world.situation_style=compact"])
    with pytest.raises(ConfigError, match="train.world has situation_style 'compact' and corpus.generator.world "
                                          "'sentences'"):
        check_run_file(compact)
    # A run.model folder trained on the world (scripts/world_scale.sh) is checked by its train.json.
    model = tmp_path / "world_lm"
    model.mkdir()
    world = dataclasses.asdict(WorldConfig(situation_style="compact"))
    (model / "train.json").write_text(json.dumps({"config": {"data": "world", "world": world}}))
    with pytest.raises(ConfigError, match=r"world_lm/train\.json's world and corpus\.generator\.world hold out "
                                          r"different situations \(split_seed: 0 vs 3\)"):
        check_run_file(load_run_file(path, [f"run.model={model}"]))
    with pytest.raises(ConfigError, match=r"world_lm/train\.json's world has situation_style 'compact'"):
        check_run_file(load_run_file(path, [f"run.model={model}", "corpus.generator.world.split_seed=0"]))
    check_run_file(load_run_file(path, [f"run.model={model}", "corpus.generator.world.split_seed=0",
                                        "corpus.generator.world.situation_style=compact"]))
    with pytest.raises(ConfigError, match="train.world draws 171 emotions and corpus.generator.world 2"):
        check_run_file(load_run_file(path, ["train.world.split_seed=3",
                                            "corpus.generator.world.concepts=[calm,happy]"]))
    run_file = load_run_file(path, ["train.world.split_seed=3", "train.world.seed=5"])  # same split, other texts
    check_run_file(run_file)
    ctx = Context(run_file=run_file, run_dir=tmp_path / "r")
    assert RUN_STAGES["experiment"]._config(ctx).suite == str(tmp_path / "r" / "corpus" / "suites" / "world_task.yaml")
    ctx = Context(run_file=load_run_file(TINY, ["experiment.suite=world_task"]), run_dir=tmp_path / "t")
    with pytest.raises(ConfigError, match="experiment.suite=world_task is a world suite, written by the corpus stage"):
        RUN_STAGES["experiment"]._config(ctx)


def test_a_subset_run_needs_its_upstream_stages_complete(tmp_path, capsys):
    code = main(["run", "--config", str(TINY), f"run.dir={tmp_path / 'r'}", "--quiet", "run.stages=[fit]"])
    err = capsys.readouterr().err
    assert code == 2 and "needs 'dump'" in err and "add dump to run.stages" in err, err


HOLD_LOCK = """
import sys, time
from emojax.locks import WriterLock
with WriterLock(sys.argv[1]):
    print("LOCKED", flush=True)
    time.sleep(600)
"""


def test_a_second_run_in_the_same_directory_fails_at_once_naming_the_holder(tmp_path, capsys):
    run_dir = tmp_path / "r"
    child = run_child(HOLD_LOCK, str(run_dir))
    try:
        assert child.stdout.readline().strip() == "LOCKED", child.stderr.read()
        code = main(["run", "--config", str(TINY), f"run.dir={run_dir}", "--quiet", "run.stages=[corpus]"])
        err = capsys.readouterr().err
        assert code == 2 and str(run_dir) in err and f"pid {child.pid}" in err, err
        assert not (run_dir / "stages").exists()
    finally:
        child.kill()
        child.wait()
    assert holder(run_dir) is None  # the kernel released the killed holder's lock


def test_a_moved_checkpoint_resumes_and_other_weights_recompute(tmp_path, capsys):
    from emojax.models import random_model
    from emojax.models.presets import SHAPES

    first, moved, other = tmp_path / "a", tmp_path / "moved", tmp_path / "b"
    random_model(SHAPES["tiny"], seed=1).save(first)
    random_model(SHAPES["tiny"], seed=2).save(other)
    run_dir = tmp_path / "r"
    args = ["run", "--config", str(TINY), f"run.dir={run_dir}", "--quiet", "run.stages=[train,corpus,dump]"]
    assert main([*args, f"run.model={first}"]) == 0
    capsys.readouterr()
    before = _hashes(run_dir)
    shutil.move(first, moved)
    assert main([*args, f"run.model={moved}"]) == 0
    err = capsys.readouterr().err
    assert all(f"{s}: skipped (complete, inputs unchanged)" in err for s in ("train", "corpus", "dump")), err
    assert _hashes(run_dir) == before
    assert main([*args, f"run.model={other}"]) == 0
    err = capsys.readouterr().err
    assert "dump: settings or inputs changed; recomputing" in err, err
    assert len(list(run_dir.glob("activations.old-*"))) == 1


KILL_RUN = """
import sys, time
from emojax.store import state, writer
from emojax.cli import main
marker = [False]
original_json, original_write = state.KeyValueFolder.write_json, writer.Writes.write
def write_json(self, key, value):
    original_json(self, key, value)
    marker[0] |= key.startswith("shards/")
def write(self, *args, **kw):
    original_write(self, *args, **kw)
    if marker[0]:
        print("READY", flush=True)  # a dump shard is complete and the next has started: wait for SIGKILL
        time.sleep(600)
state.KeyValueFolder.write_json, writer.Writes.write = write_json, write
sys.exit(main(["run", "--quiet", *sys.argv[1:]]))
"""


def test_killed_during_dump_then_resumed_equals_an_uninterrupted_run(tiny_run, cache, tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    stages = "run.stages=[train,corpus,dump,fit]"
    child = run_child(KILL_RUN, "--config", str(TINY), f"run.dir={run_dir}", stages,
                      env_extra={"EMOJAX_CACHE": str(cache)})
    line = child.stdout.readline()
    assert line.strip() == "READY", child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert main(["run", "--config", str(TINY), f"run.dir={run_dir}", stages, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "corpus: skipped (complete, inputs unchanged)" in captured.err
    assert "dump: resuming an unfinished run" in captured.err
    assert "1 shard(s) already complete, skipped" in captured.err
    assert_same_store(run_dir / "activations", tiny_run[0] / "activations")
    a, b = load_bank(run_dir / "concepts"), load_bank(tiny_run[0] / "concepts")
    np.testing.assert_array_equal(a.vectors, b.vectors)


@pytest.mark.parametrize("override, message", [
    ("dump.layer=[1]", "unknown key(s) ['dump.layer']"),
    ("dump.pool_start=abc", "dump.pool_start must be a number"),
    ("run.model=/no/such/checkpoint", "/no/such/checkpoint"),
    ("sae.out=x", "set by `emojax run`"),
])
def test_bad_configs_are_one_line_errors(tmp_path, capsys, override, message):
    code = main(["run", "--config", str(TINY), f"run.dir={tmp_path / 'r'}", override, "--quiet",
                 "run.stages=[train,corpus,dump]"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


CRASH_RUN = """
import os, signal, sys
from emojax.cli import main
from emojax.run import stages
from emojax.sae.checkpoint import SaeCheckpoints
from emojax.store import state, writer

# Kill this process with SIGKILL at the N-th write event of stage S (or, if S has fewer, when its work is done
# but before its record says so): every durable write (os.replace, os.rename), every store array or JSON write
# and every SAE checkpoint save is an event, before and after it. Target "none": run to the end.
target, n = sys.argv[1], int(sys.argv[2])
order = list(stages.STAGES)
current, count = [None], [0]

def event(tag):
    if current[0] is None or target == "none":
        return
    due = current[0] == target and count[0] + 1 >= n
    late = order.index(current[0]) > order.index(target)
    if current[0] == target:
        count[0] += 1
    if due or late:
        print(f"KILLED {current[0]} event {count[0]} {tag}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

def hook(owner, name):
    original = getattr(owner, name)
    def wrapped(*args, **kw):
        event(name + " before")
        result = original(*args, **kw)
        event(name + " after")
        return result
    setattr(owner, name, wrapped)

for name, stage in stages.STAGES.items():
    def run(ctx, _run=stage.run, _name=name):
        current[0] = _name
        event("start")
        result = _run(ctx)
        if _name == target and target != "none":
            print(f"KILLED {_name} event {count[0]} finished, unrecorded", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    stage.run = run
for owner, name in ((os, "replace"), (os, "rename"), (writer.Writes, "write"), (state.KeyValueFolder, "write_json"),
                    (SaeCheckpoints, "save")):
    hook(owner, name)
code = main(["run", "--quiet", *sys.argv[3:]])
print("FINISHED", flush=True)
sys.exit(code)
"""


def _crash_schedule(seed: int, kills: int = 10) -> list[tuple[str, int]]:
    """`kills` (stage, event) points in run order, drawn from a seeded generator: one in each stage after train
    (whose model the module's cache already holds), the rest anywhere; never the first event (the stage's start,
    before any write)."""
    rng = np.random.default_rng(seed)
    order = [s for s in STAGES if s != "train"]
    picks = sorted([*range(len(order)), *rng.choice(len(order), size=kills - len(order), replace=True)])
    return [(order[i], int(rng.integers(2, 9))) for i in picks]


def _crash_child(run_dir: Path, cache: Path, stage: str = "none", n: int = 0) -> str | None:
    """Runs the tiny run in a child killed at (stage, n); the line saying where it was killed, or None."""
    child = run_child(CRASH_RUN, stage, str(n), "--config", str(TINY), f"run.dir={run_dir}",
                      env_extra={"EMOJAX_CACHE": str(cache)})
    out, err = child.communicate(timeout=600)
    if "KILLED" in out:
        assert child.returncode == -signal.SIGKILL, err
        return out.strip().splitlines()[-1]
    assert "FINISHED" in out and child.returncode == 0, err  # the run had passed this point: it finished
    return None


def test_killed_at_ten_seeded_points_then_resumed_equals_an_uninterrupted_run(tiny_run, cache, tmp_path):
    # XLA on CPU sums in an order that depends on the process's device count, so the reference is run in a
    # child like the killed runs (one device), not taken from the in-process fixture.
    run_dir, reference = tmp_path / "tiny", tmp_path / "reference"
    schedule = _crash_schedule(seed=16)
    killed = [line for stage, n in schedule if (line := _crash_child(run_dir, cache, stage, n))]
    assert len(killed) == len(schedule) == 10, killed
    assert {line.split()[1] for line in killed} == {s for s in STAGES if s != "train"}, killed  # every stage hit
    assert _crash_child(run_dir, cache) is None
    assert _crash_child(reference, cache) is None
    assert_same_store(run_dir / "activations", reference / "activations")
    compared = [p.relative_to(reference) for p in sorted(reference.rglob("*")) if p.is_file()
                and p.parts[len(reference.parts)] in ("corpus", "concepts", "validate", "sae", "steer", "experiment")
                and "checkpoints" not in p.parts and p.name != ".emojax.lock"]
    assert len(compared) >= 15, compared
    for name in compared:
        ours, theirs = (run_dir / name).read_bytes(), (reference / name).read_bytes()
        if name.suffix in (".json", ".jsonl"):  # the same but for the run folder's own path
            ours = ours.replace(str(run_dir).encode(), b"RUN")
            theirs = theirs.replace(str(reference).encode(), b"RUN")
        assert ours == theirs, (str(name), killed)
    assert "<html" in (run_dir / "report" / "index.html").read_text()
    assert not list(run_dir.glob("*.old-*")), "a resume must not move outputs aside"


@pytest.mark.parametrize("stage, folder", [("fit", "concepts"), ("sae", "sae"), ("steer", "steer"),
                                           ("report", "report")])
def test_a_full_disk_in_a_stage_is_one_line_and_a_rerun_completes(tiny_run, cache, tmp_path, capsys, monkeypatch,
                                                                   stage, folder):
    import errno

    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run[0], run_dir)
    (run_dir / "stages" / f"{stage}.json").unlink()
    shutil.rmtree(run_dir / folder)
    replace = os.replace

    def full_disk(src, dst, *args, **kw):  # the stage's first durable write finds the disk full
        if Path(dst).is_relative_to(run_dir / folder):
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return replace(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    args = ["run", "--config", str(TINY), f"run.dir={run_dir}", "--quiet", f"run.stages=[{stage}]"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(f"{stage}: ")]
    assert len(errors) == 1 and errors[0].startswith("emojax: error: no space left"), errors
    monkeypatch.setattr(os, "replace", replace)
    assert main(args) == 0
    assert "resuming an unfinished run" in capsys.readouterr().err
    reference = tiny_run[0] / folder
    for path in reference.rglob("*"):
        if path.is_file() and path.suffix in (".safetensors", ".json") and "checkpoints" not in path.parts:
            assert (run_dir / folder / path.relative_to(reference)).is_file(), path
    if stage == "fit":
        same = (run_dir / folder / "bank.safetensors").read_bytes() == (reference / "bank.safetensors").read_bytes()
        assert same
