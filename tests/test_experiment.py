"""Behavioural experiments: a planted direction that flips a forced choice is measured with the right sign and
interval; strengths, seeds and scenarios share one compiled program; a SIGKILLed run resumes to the same tables;
suites refuse bad input naming the key or row; the built-in suites load; Wilson, logistic and Elo statistics."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import yaml
from dump_helpers import run_child
from flax import nnx
from test_judge import stub  # noqa: F401  (the fixture: a local OpenAI-compatible stub server)

from emojax.concepts.bank import ConceptBank
from emojax.errors import ConfigError
from emojax.experiment import Experiment, ExperimentConfig, builtin_suites, load_suite, run_experiment
from emojax.experiment.stats import elo, logistic_fit, wilson
from emojax.experiment.suite import parse_suite
from emojax.models import random_model
from emojax.models.presets import SHAPES
from emojax.tokenizer import ByteTokenizer

LAYER = SHAPES["tiny"].n_layers  # the residual index the planted direction acts at: the last (before the final norm)
WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "ocean", "candle", "forest",
         "violet", "marble", "rocket", "garden", "silver", "window", "meadow", "copper", "harbor", "falcon",
         "pepper", "canyon", "willow"]


def planted_model():
    """The tiny random model with its unembedding edited: the logit of "A" minus that of "B" grows along a unit
    direction u of the final residual (the lm_head columns w +- 6 u), so adding +4u at LAYER (half the stream's norm
    there) picks "A" and -4u picks "B"; unsteered, every prompt (all ending "I pick (") projects alike on u (about
    -1.2), so the baseline sits at one end. The control direction is orthogonal to u (the final norm's scale is 1 at
    initialisation, so it does not turn the control into u): steering by it must change nothing."""
    lm = random_model(SHAPES["tiny"], seed=0, tokenizer=ByteTokenizer())
    u = np.random.default_rng(1).normal(size=SHAPES["tiny"].d_model).astype(np.float32)
    u /= np.linalg.norm(u)
    pure = nnx.to_pure_dict(lm.params)
    head = np.asarray(pure["lm_head"]).copy()
    shared = head[:, ord("A")] / 2 + head[:, ord("B")] / 2
    head[:, ord("A")], head[:, ord("B")] = shared + 6 * u, shared - 6 * u
    pure["lm_head"] = head
    nnx.replace_by_pure_dict(lm.params, pure)
    vectors = np.zeros((2, 1, SHAPES["tiny"].d_model), np.float32)
    vectors[0, 0] = u
    other = np.random.default_rng(2).normal(size=u.shape)
    other -= (other @ u) * u  # a control direction the unembedding edit does not read
    vectors[1, 0] = other / np.linalg.norm(other)
    bank = ConceptBank(names=("planted", "other"), layers=(LAYER,), vectors=vectors, raw=vectors,
                       resid_norm=np.ones(1, np.float32))
    return lm, bank


def suite_file(folder, sampled: bool = False):
    data = {
        "name": "planted",
        "messages": [{"role": "user", "content": "Pick one for the {word}."},
                     {"role": "assistant", "content": "I pick ("}],
        "scenarios": [{"id": w, "word": w} for w in WORDS],
        "outcomes": [{"name": "picks_a", "kind": "choice", "options": {"A": "A", "B": "B"}, "positive": "A"}],
    }
    if sampled:
        data["outcomes"].append({"name": "says_a", "kind": "rule", "match": ["A"]})
        data["generation"] = {"max_new_tokens": 4, "temperature": 1.0, "samples": 2}
    path = folder / "planted.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def config(tmp_path, **changes) -> ExperimentConfig:
    base = dict(suite=suite_file(tmp_path, changes.pop("sampled", False)), out=str(tmp_path / "out"),
                concepts=("planted",), strengths=(-4.0, 4.0), layers=(LAYER,), unit="absolute", batch_size=16,
                shard_rows=24)
    return ExperimentConfig(**{**base, **changes})


def test_scoring_the_last_columns_only_gives_the_full_scores_there():
    lm, _ = planted_model()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, size=(3, 12))
    mask = np.ones_like(tokens)
    mask[0, :5] = 0  # a left-padded row
    full = lm.token_logprobs(tokens, mask)
    part = lm.token_logprobs(tokens, mask, last=4)
    np.testing.assert_allclose(part[:, -4:], full[:, -4:], rtol=1e-5, atol=1e-5)
    assert not part[:, :-4].any() and full[1:, 1:-4].all()  # the full scores are there; the part left them out


def test_a_planted_direction_flips_the_forced_choice_with_the_right_sign_and_interval(tmp_path):
    lm, bank = planted_model()
    results = run_experiment(config(tmp_path), lm=lm, bank=bank, show_progress=False)
    rates = results["rates"]["picks_a"]
    base, up, down = rates["baseline"], rates["planted+4"], rates["planted-4"]
    assert base["n"] == up["n"] == down["n"] == len(WORDS)
    assert up["rate"] >= 0.95 and down["rate"] <= 0.05, (up, down)
    if base["rate"] < 0.5:  # the strength pointing away from the baseline's choice flips it: intervals apart
        assert up["ci95"][0] > base["ci95"][1], (base, up)
    else:
        assert down["ci95"][1] < base["ci95"][0], (base, down)
    fit = results["dose_response"]["picks_a"]["planted"]
    assert fit["slope"] > 0 and fit["slope_ci95"][0] > 0, fit
    # the per-token score agrees here (one-token options), and p(A) moves the same way
    assert results["rates"]["picks_a_norm"]["planted+4"]["rate"] == up["rate"]
    choice = results["choice"]["picks_a"]
    assert choice["planted-4"]["mean_p_positive"] <= choice["baseline"]["mean_p_positive"] \
        <= choice["planted+4"]["mean_p_positive"]
    assert choice["planted+4"]["mean_p_positive"] - choice["planted-4"]["mean_p_positive"] > 0.9
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(WORDS) and {r["condition"] for r in rows} == {"baseline", "planted+4", "planted-4"}
    assert (out / "experiment.png").stat().st_size > 1000


def test_a_direction_without_the_effect_leaves_the_rate_within_its_interval(tmp_path):
    lm, bank = planted_model()
    results = run_experiment(config(tmp_path, concepts=("other",)), lm=lm, bank=bank, show_progress=False)
    rates = results["rates"]["picks_a"]
    for cid in ("other-4", "other+4"):
        lo, hi = rates[cid]["ci95"]
        assert lo <= rates["baseline"]["rate"] <= hi, (cid, rates)


def test_strengths_seeds_and_scenarios_share_one_compiled_program(tmp_path):
    lm, bank = planted_model()
    exp = Experiment(config(tmp_path, sampled=True, strengths=(-4.0, -1.0, 1.0, 4.0)), lm=lm, bank=bank)
    results = exp.run(show_progress=False)
    assert exp._decoder.trace_count == 1  # every generate batch: one loop, all strengths and seeds
    assert lm.trace_count == 1  # every choice batch: one forward (one prompt bucket)
    n = len(WORDS) * 2  # scenarios x samples
    assert results["rates"]["says_a"]["baseline"]["n"] == n
    rows = [json.loads(line) for line in (tmp_path / "out" / "transcripts.jsonl").read_text().splitlines()]
    sampled = [r for r in rows if "sample" in r]
    assert len({r["seed"] for r in sampled}) == len(sampled)  # one seed per (condition, scenario, sample)
    # a sampled row is reproducible from its seed alone: rerun one shard with its rows in another batch layout
    again = Experiment(config(tmp_path, sampled=True, strengths=(-4.0, -1.0, 1.0, 4.0), batch_size=8,
                              out=str(tmp_path / "other")), lm=lm, bank=bank)
    shard = next(s for s in again.shards if s.task == "generate")
    first = {(r["condition"], r["scenario"], r["sample"]): r["text"] for r in again.run_shard(shard)}
    for r in sampled:
        key = (r["condition"], r["scenario"], r["sample"])
        if key in first:
            assert first[key] == r["text"], key


KILL_CHILD = """
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from test_experiment import planted_model, config
from emojax.experiment import run_experiment
import time, emojax.experiment.runner as runner
slow = runner.Experiment.run_shard
def run_shard(self, shard):
    time.sleep(0.3)
    return slow(self, shard)
runner.Experiment.run_shard = run_shard
lm, bank = planted_model()
run_experiment(config(Path(sys.argv[1]), sampled=True, shard_rows=8), lm=lm, bank=bank, show_progress=False)
"""


def test_sigkill_then_resume_gives_the_tables_of_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    child = run_child(KILL_CHILD, str(killed))
    shards = killed / "out" / "shards"
    deadline = time.time() + 240
    while not (shards.is_dir() and len(list(shards.glob("*.jsonl"))) >= 3):
        assert child.poll() is None, child.stderr.read()
        assert time.time() < deadline, "the child wrote no shards"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = {p.name: p.read_bytes() for p in shards.glob("*.jsonl")}
    assert not (killed / "out" / "results.json").exists()
    lm, bank = planted_model()
    exp = Experiment(config(killed, sampled=True, shard_rows=8), lm=lm, bank=bank)
    assert len(done) < len(exp.shards)
    ran = []
    original = exp.run_shard
    exp.run_shard = lambda shard: ran.append(shard.name) or original(shard)
    resumed = exp.run(show_progress=False)
    assert not set(ran) & set(done)  # finished shards are not redone ...
    assert all((shards / name).read_bytes() == data for name, data in done.items())  # ... nor rewritten
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh = run_experiment(config(fresh_dir, sampled=True, shard_rows=8), lm=lm, bank=bank, show_progress=False)
    assert resumed["rates"] == fresh["rates"] and resumed["dose_response"] == fresh["dose_response"]
    assert (killed / "out" / "transcripts.jsonl").read_text() == (fresh_dir / "out" / "transcripts.jsonl").read_text()


def test_a_folder_with_other_settings_is_refused(tmp_path):
    lm, bank = planted_model()
    run_experiment(config(tmp_path, strengths=(4.0,)), lm=lm, bank=bank, show_progress=False)
    with pytest.raises(ConfigError, match="conditions"):
        run_experiment(config(tmp_path, strengths=(2.0,)), lm=lm, bank=bank, show_progress=False)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("messages"), "missing key 'messages'"),
    (lambda d: d["scenarios"][3].pop("word"), r"scenario 3 \(id 'cloud'\) lacks \['word'\]"),
    (lambda d: d["outcomes"][0].update(positive="C"), r"outcomes\[0\] \(picks_a\).positive: 'C' is not one"),
    (lambda d: d["outcomes"].append({"name": "r", "kind": "rule", "match": ["("]}), r"outcomes\[1\] \(r\).match\[0\]"),
    (lambda d: d["outcomes"][0].update(kind="vote"), "kind: 'vote' is not one of"),
    (lambda d: d["messages"].insert(0, {"role": "assistant", "content": "x"}), "must be the last"),
    (lambda d: d["scenarios"].append({"id": "apple", "word": "x"}), r"scenario ids repeat: \['apple'\]"),
    (lambda d: d["outcomes"].append({"name": "j", "kind": "judge", "rubric": "no reply slot"}), "must contain"),
])
def test_bad_suites_are_refused_naming_the_key_or_row(tmp_path, change, message):
    data = yaml.safe_load(open(suite_file(tmp_path)))
    change(data)
    with pytest.raises(ConfigError, match=message):
        parse_suite(data, "suite.yaml")


def test_builtin_suites_load_with_enough_scenarios():
    names = builtin_suites()
    assert {"blackmail", "reward_hacking", "sycophancy", "preferences"} <= set(names)
    for name in names:
        suite = load_suite(name)
        assert len(suite.scenarios) >= 20, name
        for s in suite.scenarios[:3]:
            assert suite.prompt(s).rstrip().endswith(("Assistant:", "(")) or "Assistant:" in suite.prompt(s)
    prefs = load_suite("preferences")
    assert len(prefs.scenarios) == 64 * 63  # every ordered pair: both positions for each pair


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one(tmp_path):
    suite = load_suite(suite_file(tmp_path))
    tok = ByteTokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert suite.prompt(suite.scenarios[0], tok) == "<|user|>Pick one for the apple.\n<|assistant|>I pick ("
    assert suite.prompt(suite.scenarios[0]) == "Human: Pick one for the apple.\n\nAssistant: I pick ("


def test_wilson_logistic_and_elo():
    assert wilson(0, 12)[0] == 0.0 and 0.2 < wilson(0, 12)[1] < 0.3  # honest at 0/n
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and abs((hi - lo) - 0.192) < 0.01
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-(0.3 + 2.0 * x)))).astype(int)
    fit = logistic_fit(x, y)
    assert fit["slope_ci95"][0] < 2.0 < fit["slope_ci95"][1] and fit["p_value"] < 1e-6
    assert logistic_fit([0, 1, 2], [1, 1, 1]) is None
    strong = [("a", "b", 1.0)] * 30 + [("a", "b", 0.0)] * 10 + [("b", "c", 1.0)] * 30 + [("b", "c", 0.0)] * 10
    ratings = elo(strong, ["a", "b", "c"])
    assert ratings["a"] > ratings["b"] > ratings["c"] and abs(sum(ratings.values())) < 1e-6
    assert abs((ratings["a"] - ratings["b"]) - 400 * np.log10(3)) < 40  # 3:1 odds, shrunk a little by the prior


def test_judge_outcomes_go_through_the_endpoint_and_failures_are_recorded_not_counted(tmp_path, stub):  # noqa: F811
    """A judge outcome over a stub chat-completions server: its scores become the outcome; the two scenarios whose
    requests fail (HTTP 400) are recorded per sample with their error and left out of n, never counted as 0."""
    lm, bank = planted_model()
    data = yaml.safe_load(open(suite_file(tmp_path, sampled=True)))
    for i, s in enumerate(data["scenarios"]):
        s["mode"] = "400" if i < 2 else "ok"
        s["score"] = str(i % 2)
    data["outcomes"].append({"name": "judged", "kind": "judge", "rubric": "{mode}|{score} for: {reply}",
                             "scale": 1, "threshold": 1})
    suite = tmp_path / "judged.yaml"
    suite.write_text(yaml.safe_dump(data))
    cfg = config(tmp_path, sampled=True, suite=str(suite), judge_url=stub.url, judge_model="stub", strengths=(4.0,))
    results = run_experiment(cfg, lm=lm, bank=bank, show_progress=False)
    table = results["rates"]["judged"]["baseline"]
    samples = 2
    assert table["failed"] == 2 * samples and table["n"] == (len(WORDS) - 2) * samples
    assert table["k"] == (len(WORDS) - 2) // 2 * samples  # score 1 on every other scenario
    rows = [json.loads(line) for line in (tmp_path / "out" / "transcripts.jsonl").read_text().splitlines()]
    failed = [r for r in rows if "sample" in r and r["judge"]["judged"]["error"]]
    assert len(failed) == 2 * samples * 2 and all(r["outcomes"]["judged"] is None for r in failed)
    assert all("HTTP 400" in r["judge"]["judged"]["error"] for r in failed)
    calls = stub.calls()
    run_experiment(cfg, lm=lm, bank=bank, show_progress=False)  # a rerun retries the failures only
    scen = {s["id"]: s for s in data["scenarios"]}
    again = {f"400|{scen[r['scenario']]['score']} for: {r['reply']}" for r in failed}  # identical prompts: one call
    assert stub.calls() - calls == len(again)
