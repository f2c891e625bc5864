"""`emojax screen` (issue P, lines 1-3): planted emotional responses are flagged (AUROC >= 0.95), the projection
difference beats the plain projection when the prompts are emotional, shards resume and are byte-identical across
worker counts, and bad input is refused naming the file, row, bank or concept.

The model is the tiny preset trained on the world (as the default built-in model is) for 240 steps of 16 rows,
cached like the built-in models. The stock tiny preset (120 steps of 8 rows on the story generator) answers every
prompt with the same greedy text (' "It was checross from the...'), so its own responses carry nothing of their
prompts and no difference against them can remove what a prompt adds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import emojax
from emojax.concepts.bank import BankError, BankModelError, ConceptBank, load_bank
from emojax.concepts.evaluate import class_aurocs
from emojax.concepts.recipe import mean_diff
from emojax.corpus.catalogue import load_catalogue
from emojax.corpus.samples import read_samples
from emojax.errors import InputError
from emojax.models.identity import model_identity
from emojax.report import build_report
from emojax.screen import FlagRule, ScreenConfig, flag
from emojax.screen.run import FLAGS_FILE, MANIFEST_FILE, SCORES_FILE, screen
from emojax.tokenizer import left_pad
from emojax.train import ensure_builtin_model, preset_config
from emojax.world import World

EMOTION = "afraid"
LAYERS = (1, 2)
WORLD_TINY = dict(data="world", steps=240, batch_size=16)


@pytest.fixture(scope="module")
def model():
    return ensure_builtin_model(config=preset_config("tiny", **WORLD_TINY), name="tiny", progress=False)


@pytest.fixture(scope="module")
def world():
    return World(0)


def _pooled(lm, texts: list[str], layer: int) -> np.ndarray:
    """The mean over documents of each document's mean residual at `layer` (its last 64 tokens: the positions)."""
    ids = [lm.tokenizer.encode(t)[-64:] for t in texts]
    tokens, mask = left_pad(ids, 64)
    hidden = np.asarray(lm(tokens, mask, capture=(layer,), logits=False).hidden[0])
    return np.stack([hidden[b, 64 - len(s):].mean(0) for b, s in enumerate(ids)]).mean(0)


@pytest.fixture(scope="module")
def bank(model, world, tmp_path_factory):
    """The study's mean difference (emojax.concepts.recipe.mean_diff) of the emotion's train-split world stories
    against neutral dialogues of topics 50-99, at residual indices 1 and 2."""
    lm = emojax.load_model(model)
    e = load_catalogue().names_list.index(EMOTION)
    stories = [world.fit_story(e, n, "train").text for n in range(48)]
    neutral = [world.neutral_dialogue(t, 0).text for t in range(50, 100)]
    raw = np.stack([mean_diff(np.stack([_pooled(lm, stories, L), _pooled(lm, neutral, L)]))[0][0] for L in LAYERS])
    vectors = raw[None].astype(np.float32)
    folder = tmp_path_factory.mktemp("bank")
    ConceptBank(names=(EMOTION,), layers=LAYERS, vectors=vectors, raw=vectors, resid_norm=np.ones(2, np.float32),
                info={"model_identity": model_identity(model), "store_model": str(model)}).save(folder)
    return folder


def _last_sentences(text: str, k: int) -> str:
    return " ".join(re.split(r'(?<=[.!?"])\s+', text)[-k:])


def _write(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _planted(world, path, n: int = 200):
    """Chat rows on neutral questions (topics 0-99, other dialogues than the bank's): every 20th answer (5%) is
    the end of a test-split story of the emotion, the rest the dialogue's neutral answer."""
    e = load_catalogue().names_list.index(EMOTION)
    rows, labels = [], []
    for i in range(n):
        topic, k = (i % 50, (i // 50) % 3) if i < 150 else (50 + i % 50, 1 + (i // 50) % 2)
        question, answer = world.neutral_dialogue(topic, k).text.removeprefix("Human: ").split("\n\nAssistant: ")
        planted = i % 20 == 7
        if planted:
            answer = _last_sentences(world.fit_story(e, i, "test").text, 3)
        rows.append({"id": f"s{i:03d}", "messages": [{"role": "user", "content": question},
                                                     {"role": "assistant", "content": answer}]})
        labels.append(planted)
    return _write(path, rows), labels


def _emotional_prompts(world, path, n: int = 200):
    """Plain rows. Flagged (every 20th): a neutral question answered by the end of an emotional story. The rest:
    an emotional story's middle as the prompt, its end as the response, emotional as the prompt warrants."""
    e = load_catalogue().names_list.index(EMOTION)
    rows, labels = [], []
    for i in range(n):
        planted = i % 20 == 7
        if planted:
            question = world.neutral_dialogue(i % 100, 2).text.split("\n\nAssistant:")[0]
            prompt, response = question + "\n\nAssistant:", " " + _last_sentences(world.fit_story(e, i, "test").text, 3)
        else:
            story = re.split(r'(?<=[.!?"])\s+', world.fit_story(e, 200 + i, "test").text)
            prompt, response = story[-4], " " + " ".join(story[-3:])
        rows.append({"id": f"e{i:03d}", "prompt": prompt, "response": response})
        labels.append(planted)
    return _write(path, rows), labels


def _config(data, bank, out, **changes) -> ScreenConfig:
    settings = dict(data=(str(data),), bank=str(bank), concepts=(EMOTION,), out=str(out), batch_size=32, n_shards=4,
                    max_new_tokens=48, examples=3, mesh=(1, 1, 1))
    return ScreenConfig(**{**settings, **changes})


def _auroc(scores, labels) -> float:
    return float(class_aurocs(np.asarray(scores)[:, None], np.where(labels, 0, 1))[0])


def _scores(out) -> dict:
    return pq.read_table(out / SCORES_FILE).to_pydict()


def _outputs(out) -> dict[str, bytes]:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and not p.name.startswith(".")}
    manifest = json.loads(files.pop(MANIFEST_FILE))
    manifest.pop("throughput")
    return files | {MANIFEST_FILE: json.dumps(manifest, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def planted_run(model, bank, world, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    data, labels = _planted(world, root / "data.jsonl")
    config = _config(data, bank, root / "run" / "screen")  # where the run's report looks for it
    return config, screen(config), labels


def test_planted_responses_are_flagged(planted_run):
    config, manifest, labels = planted_run
    root = Path(config.out)
    scores = _scores(root)
    assert scores["sample_id"] == sorted(scores["sample_id"]) and len(scores["sample_id"]) == 200
    by_id = dict(zip([f"s{i:03d}" for i in range(200)], labels))
    labels = [by_id[s] for s in scores["sample_id"]]
    proj, diff = _auroc(scores[f"proj_{EMOTION}"], labels), _auroc(scores[f"diff_{EMOTION}"], labels)
    print(f"planted, neutral prompts: AUROC proj {proj:.3f}, diff {diff:.3f}")
    assert proj >= 0.95 and diff >= 0.95
    assert np.allclose(np.asarray(scores[f"diff_{EMOTION}"]),
                       np.asarray(scores[f"proj_{EMOTION}"]) - np.asarray(scores[f"own_{EMOTION}"]))
    assert manifest["layer"] == 1 and manifest["samples"] == 200  # the bank's layer: nearest 2/3 of 2 layers
    assert manifest["tokens"]["own"] == sum(scores["n_own_tokens"]) and min(scores["n_own_tokens"]) >= 1
    assert manifest["throughput"]["samples"] == 200 and manifest["throughput"]["samples_per_s"] > 0
    # flags.jsonl: the rule's samples, in rank order, matching the scores
    flags = [json.loads(line) for line in (root / FLAGS_FILE).read_text().splitlines()]
    expected = flag(np.asarray(scores[f"diff_{EMOTION}"]), np.asarray(scores["sample_id"]), FlagRule())
    assert [f["sample_id"] for f in flags] == [scores["sample_id"][i] for i in expected.flagged]
    assert len(flags) == manifest["flags"][EMOTION]["flagged"] >= 1 and all(by_id[f["sample_id"]] for f in flags)
    # the per-token projections of the top samples are kept, one per response token
    kept = [i for i, t in enumerate(scores["tokens"]) if t is not None]
    top = expected.order[:3]
    assert set(top) <= set(kept)
    for i in kept:
        assert len(scores["tokens"][i]) == len(scores[f"tokens_{EMOTION}"][i]) == scores["n_response_tokens"][i]
        assert np.isclose(np.mean(scores[f"tokens_{EMOTION}"][i]), scores[f"proj_{EMOTION}"][i], atol=1e-5)


def test_scores_match_a_forward_of_each_sample_alone(planted_run, model):
    """proj and own against an independent reference: a forward of the sample alone (prompt + response), and of the
    prompt + the model's own greedy tokens, generated one by one by full forwards (no cache, no decode loop)."""
    config, manifest, _ = planted_run
    scores = _scores(Path(config.out))
    lm = emojax.load_model(model)
    v = load_bank(config.bank).vector(EMOTION, manifest["layer"], unit=True)
    samples = {s.sample_id: s for s in read_samples(config.data)}

    def mean_projection(ids: list[int], n_last: int) -> float:
        hidden = lm(*left_pad([ids], 64), capture=(manifest["layer"],), logits=False).hidden[0][0]
        return float((np.asarray(hidden, np.float64)[-n_last:] @ v).mean())

    for i in (0, 7, 113):
        ids, n_prompt = samples[scores["sample_id"][i]].token_ids(lm.tokenizer)
        ids = ids[:64]
        assert np.isclose(mean_projection(ids, len(ids) - n_prompt), scores[f"proj_{EMOTION}"][i], atol=1e-4)
        own = ids[:n_prompt]
        for _ in range(scores["n_own_tokens"][i]):
            own.append(int(np.argmax(np.asarray(lm(*left_pad([own], 64)).logits[0, -1]))))
        assert np.isclose(mean_projection(own, scores["n_own_tokens"][i]), scores[f"own_{EMOTION}"][i], atol=1e-4)


def test_difference_beats_projection_when_prompts_are_emotional(model, bank, world, tmp_path):
    data, labels = _emotional_prompts(world, tmp_path / "data.jsonl")
    config = _config(data, bank, tmp_path / "out", flag=FlagRule(method="top", value=0.05))
    screen(config)
    scores = _scores(tmp_path / "out")
    by_id = dict(zip([f"e{i:03d}" for i in range(200)], labels))
    labels = [by_id[s] for s in scores["sample_id"]]
    proj, diff = _auroc(scores[f"proj_{EMOTION}"], labels), _auroc(scores[f"diff_{EMOTION}"], labels)
    print(f"emotional prompts: AUROC proj {proj:.3f}, diff {diff:.3f}")
    assert diff > proj + 0.25 and diff >= 0.8  # measured: proj 0.437, diff 0.835
    flags = [json.loads(line) for line in (tmp_path / "out" / FLAGS_FILE).read_text().splitlines()]
    assert len(flags) == 10 and [f["rank"] for f in flags] == list(range(1, 11))


def test_a_deleted_shard_is_all_a_rerun_scores(planted_run):
    config, _, _ = planted_run
    out = Path(config.out)
    before = _outputs(out)
    shard = sorted((out / "shards").glob("*.parquet"))[2]
    shard.unlink()
    manifest = screen(config)
    assert manifest["throughput"]["shards_scored"] == 1 and manifest["throughput"]["shards_skipped"] == 3
    assert _outputs(out) == before


def test_worker_counts_write_the_same_bytes(planted_run, tmp_path):
    config, _, _ = planted_run
    threads = _config(config.data[0], config.bank, tmp_path / "threads")
    screen(threads, ["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    assert _outputs(tmp_path / "threads") == _outputs(Path(config.out))


def test_multiprocess_workers_write_the_same_bytes(planted_run, tmp_path):
    config, _, _ = planted_run
    processes = _config(config.data[0], config.bank, tmp_path / "processes")
    screen(processes, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert _outputs(tmp_path / "processes") == _outputs(Path(config.out))


def test_bad_input_is_refused_naming_file_row_bank_and_concept(model, bank, tmp_path):
    good = {"prompt": "Human: Where is the station?\n\nAssistant:", "response": " Down the road."}
    data = _write(tmp_path / "bad.jsonl", [good, {"prompt": "Hi", "response": 3}])
    with pytest.raises(InputError, match=r"bad\.jsonl, line 2: 'response' must be text"):
        screen(_config(data, bank, tmp_path / "out"))
    data = _write(tmp_path / "long.jsonl", [good, {"prompt": "word " * 80, "response": " fine."}])
    with pytest.raises(InputError, match=r"long\.jsonl, line 2: sample 'long\.jsonl:2': the prompt has \d+ tokens"):
        screen(_config(data, bank, tmp_path / "out"))
    data = _write(tmp_path / "good.jsonl", [good])
    with pytest.raises(BankError, match="concept 'calm' is not in the bank"):
        screen(_config(data, bank, tmp_path / "out", concepts=(EMOTION, "calm")))
    with pytest.raises(BankModelError, match="fitted on .* not on random:tiny"):
        screen(_config(data, bank, tmp_path / "out", model="random:tiny"))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_flag_rules_rank_by_score_then_id():
    scores = np.array([0.5, 2.0, 0.5, -1.0, 3.0, 0.0])
    ids = np.array(["f", "e", "a", "d", "c", "b"])
    assert flag(scores, ids, FlagRule(method="threshold", value=0.5)).flagged.tolist() == [4, 1, 2, 0]
    top = flag(scores, ids, FlagRule(method="top", value=0.5))
    assert top.flagged.tolist() == [4, 1, 2] and top.cutoff == 0.5
    z = flag(scores, ids, FlagRule(method="zscore", value=0.8))
    mean, std = scores.mean(), scores.std(ddof=1)
    assert np.allclose(z.z, (scores - mean) / std) and z.flagged.tolist() == [4, 1]
    assert np.isclose(z.cutoff, mean + 0.8 * std)
    assert flag(np.ones(3), np.array(["b", "a", "c"]), FlagRule()).n_flagged == 0
    with pytest.raises(ValueError, match="fraction in"):
        FlagRule(method="top", value=2.0)


def test_report_shows_histograms_and_top_flagged_tokens(planted_run, tmp_path):
    config, manifest, _ = planted_run
    run_dir = Path(config.out).parent
    html = build_report(run_dir).read_text()
    section = re.search(r'<section id="screening" data-status="ok">.*?</section>', html, re.S).group(0)
    assert len(re.findall(r'<img src="data:image/png;base64,', section)) == 1
    scores = _scores(Path(config.out))
    top = flag(np.asarray(scores[f"diff_{EMOTION}"]), np.asarray(scores["sample_id"]), FlagRule()).flagged[:5]
    for i in top:
        assert f"<p>{scores['sample_id'][i]}: diff " in section
    assert section.count("<span title=") == sum(scores["n_response_tokens"][i] for i in top)
    assert f"<td>{EMOTION}</td><td>{manifest['flags'][EMOTION]['flagged']}</td>" in section
    (tmp_path / "empty").mkdir()
    assert 'id="screening"' not in build_report(tmp_path / "empty").read_text()  # no screen: no section


def test_cli_screens_with_flags_and_overrides(model, bank, tmp_path, capsys):
    from emojax.cli import main

    rows = [{"prompt": "Human: Where is the station?\n\nAssistant:", "response": f" Down the road, {k} minutes."}
            for k in range(5)]
    data = _write(tmp_path / "d.jsonl", rows)
    args = ["screen", "--data", str(data), "--bank", str(bank), "--concepts", EMOTION, "--out", str(tmp_path / "o"),
            "n_shards=2", "batch_size=32", "max_new_tokens=48", "examples=3", "mesh=[1,1,1]", "flag.method=top",
            "flag.value=0.2", "flag.by=proj"]
    assert main(args) == 0
    assert re.search(rf"{EMOTION}\s.*1 of 5", capsys.readouterr().out)
    flags = [json.loads(line) for line in (tmp_path / "o" / FLAGS_FILE).read_text().splitlines()]
    scores = _scores(tmp_path / "o")
    assert [f["sample_id"] for f in flags] == [scores["sample_id"][int(np.argmax(scores[f"proj_{EMOTION}"]))]]
    assert main([*args[:-1], "flag.by=proof"]) == 2  # a bad setting is one line naming it
    assert "flag.by='proof' is not one of" in capsys.readouterr().err
