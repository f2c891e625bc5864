"""Multi-turn episodes: the conversation grows by an attempt and a failure message each turn; the readout is taken at
the prompt's last token and over the reply (checked against a separate forward); an interrupted run resumes to the
same tables; the trend, first-shortcut and lead-up statistics find a planted rise and report no trend in noise;
bad settings are refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_experiment import LAYER, planted_model, suite_file

from emojax.concepts.evaluate import concept_readout
from emojax.config_loader import load_section
from emojax.errors import ConfigError
from emojax.experiment.config import EpisodeConfig
from emojax.experiment.episodes import Episodes, run_episodes, summarise, summary_text
from emojax.experiment.suite import Outcome
from emojax.tokenizer import chat_prompt, left_pad


def episode_config(tmp_path, **changes) -> EpisodeConfig:
    base = dict(suite=suite_file(tmp_path, sampled=True), out=str(tmp_path / "out"), concepts=("planted", "other"),
                layer=LAYER, metric="dot", turns=3, feedback=("No, that was not it ({word}, try {turn}).",),
                attempt="B", scenarios=5, samples=1, temperature=0.0, max_new_tokens=4, batch_size=4)
    return EpisodeConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def planted():
    return planted_model()


def test_an_episode_reads_the_whole_conversation_and_resumes_to_the_same_tables(tmp_path, planted):
    lm, bank = planted
    episodes = Episodes(episode_config(tmp_path), lm=lm, bank=bank)
    assert len(episodes.episodes) == 5
    messages = episodes.messages(0, ["B", "B"])
    word = episodes.scenarios[0]["word"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "I pick (B" and messages[-1]["content"] == "I pick ("  # attempt after prefill
    assert messages[4]["content"] == f"No, that was not it ({word}, try 2)."
    narrated = Episodes(episode_config(tmp_path, history="narrated"), lm=lm, bank=bank).messages(0, ["B", "B"])
    assert narrated == [{"role": "user", "content": f"Pick one for the {word}. B No, that was not it ({word}, try 1)."
                                                    f" B No, that was not it ({word}, try 2)."},
                        {"role": "assistant", "content": "I pick ("}]

    whole = run_episodes(episode_config(tmp_path, out=str(tmp_path / "whole")), lm=lm, bank=bank,
                         show_progress=False)
    first = Episodes(episode_config(tmp_path, out=str(tmp_path / "split")), lm=lm, bank=bank)
    assert first.run(show_progress=False, stop_after=1) is None
    assert sorted(p.name for p in (tmp_path / "split" / "turns").iterdir()) == ["turn-001.jsonl"]
    resumed = run_episodes(episode_config(tmp_path, out=str(tmp_path / "split")), lm=lm, bank=bank,
                           show_progress=False)
    assert resumed == whole
    assert (tmp_path / "whole" / "episodes.png").stat().st_size > 0
    records = [json.loads(x) for x in (tmp_path / "whole" / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 3 and {r["attempt"] for r in records} == {"B"}
    controlled = Episodes(episode_config(tmp_path, control=("Yes, that was it.",)), lm=lm, bank=bank)
    assert len(controlled.episodes) == 10 and controlled.messages(7, ["B"])[2]["content"] == "Yes, that was it."

    # The ':' reading of turn 3 is the readout of the last prompt token of the full conversation.
    rec = next(r for r in records if r["turn"] == 3 and r["episode"] == 2)
    ids = episodes.tokenizer.encode_prompt(chat_prompt(episodes.messages(2, ["B", "B"]), episodes.tokenizer))
    tokens, mask = left_pad([ids])
    hidden = np.asarray(lm(tokens, mask, capture=(LAYER,), logits=False).hidden[0], np.float64)
    expected = concept_readout(hidden[0, -1], bank.at_layer(LAYER), None, "dot")
    np.testing.assert_allclose([rec["colon"]["planted"], rec["colon"]["other"]], expected, rtol=2e-3, atol=2e-3)

    longer = run_episodes(episode_config(tmp_path, out=str(tmp_path / "split"), turns=4), lm=lm, bank=bank,
                          show_progress=False)  # more turns extend the episodes
    assert longer["turns"] == 4 and longer["arms"]["failure"]["per_turn"][:3] == whole["arms"]["failure"]["per_turn"]
    with pytest.raises(ConfigError, match="feedback"):  # other settings into the same folder are refused
        run_episodes(episode_config(tmp_path, out=str(tmp_path / "whole"), feedback=("Again.",)), lm=lm, bank=bank,
                     show_progress=False)


def test_bad_episode_settings_are_refused_naming_the_key(tmp_path, planted):
    lm, bank = planted
    with pytest.raises(ConfigError, match="episodes.attempt='C'"):
        Episodes(episode_config(tmp_path, attempt="C"), lm=lm, bank=bank)
    with pytest.raises(ConfigError, match=r"\['mood'\] is not a placeholder"):
        Episodes(episode_config(tmp_path, feedback=("Try again, {mood}.",)), lm=lm, bank=bank)
    with pytest.raises(ConfigError, match="episodes.feedback"):
        EpisodeConfig(feedback=())
    with pytest.raises(ConfigError, match="episodes.metric"):
        EpisodeConfig(metric="probability")


def _records(reads_ET, shortcut_ET, p_ET) -> list[list[dict]]:
    E, T = reads_ET.shape
    return [[{"colon": {"desperate": float(reads_ET[e, t])}, "reply_mean": {"desperate": float(reads_ET[e, t]) / 2},
              "outcomes": {"cheat": int(shortcut_ET[e, t]), "cheat_norm": int(shortcut_ET[e, t])},
              "choice": {"cheat": {"p_positive": float(p_ET[e, t])}}} for e in range(E)] for t in range(T)]


def test_the_tables_find_a_planted_rise_and_no_trend_in_noise():
    rng = np.random.default_rng(0)
    E, T = 60, 6
    turn = np.arange(1, T + 1)
    rising = 0.3 * turn + rng.normal(0, 0.5, (E, T))
    p = 1 / (1 + np.exp(-(turn - 4)))  # the shortcut grows likelier each turn
    took = rng.random((E, T)) < p
    cheat = Outcome("cheat", "choice", options={"yes": " yes", "no": " no"}, positive="yes")
    results = summarise(_records(rising, took, np.broadcast_to(p, (E, T))), ("desperate",), cheat, [cheat])
    table = results["arms"]["failure"]
    trend = table["readout_trend"]["desperate"]
    assert trend["colon"]["rises"] and trend["colon"]["ci95"][0] < 0.3 < trend["colon"]["ci95"][1]
    assert trend["reply_mean"]["slope_per_turn"] == pytest.approx(trend["colon"]["slope_per_turn"] / 2)
    assert results["shortcut"] == "cheat_norm" and table["shortcut_trend"]["ci95"][0] > 0
    first = [int(np.argmax(row)) + 1 for row in took if row.any()]
    assert table["first_shortcut"]["episodes_taking_it"] == len(first)
    assert table["first_shortcut"]["by_turn"] == {str(t): first.count(t) for t in range(1, T + 1)}
    at = {x["relative_turn"]: x for x in table["lead_up"]}
    assert at[0]["episodes"] == len(first)
    firsts = [(e, int(np.argmax(row))) for e, row in enumerate(took) if row.any()]
    assert at[0]["readout"]["desperate"]["colon"]["mean"] == pytest.approx(np.mean([rising[e, t] for e, t in firsts]))
    assert [r["outcomes"]["cheat_norm"]["k"] for r in table["per_turn"]] == took.sum(0).tolist()
    assert "rises" in summary_text({**results, "suite": "s", "layer": 1, "metric": "z", "attempt": "reply"})

    # In noise the interval is a 95% one: over 100 draws about 5 call a trend, never many more.
    called = 0
    for _ in range(100):
        flat = summarise(_records(rng.normal(0, 0.5, (E, T)), np.zeros((E, T)), np.zeros((E, T))), ("desperate",),
                         cheat, [cheat])
        noise = flat["arms"]["failure"]["readout_trend"]["desperate"]["colon"]
        called += noise["rises"] or noise["falls"]
    assert called <= 12
    flat = flat["arms"]["failure"]
    assert flat["shortcut_trend"]["p_value"] is None and flat["first_shortcut"]["episodes_taking_it"] == 0
    assert flat["lead_up"] == []

    # With a control arm, a drift both arms share (the text growing) cancels; what only failure adds remains.
    drift = 0.2 * turn + rng.normal(0, 0.3, (E, T))
    failure = _records(drift + 0.1 * turn, took, np.broadcast_to(p, (E, T)))
    control = _records(drift + rng.normal(0, 0.3, (E, T)), took, np.broadcast_to(p, (E, T)))
    paired = summarise([[{**r, "arm": "failure"} for r in f] + [{**r, "arm": "control"} for r in c]
                        for f, c in zip(failure, control)], ("desperate",), cheat, [cheat], ("failure", "control"))
    against = paired["against_control"]["desperate"]["colon"]
    assert paired["arms"]["control"]["readout_trend"]["desperate"]["colon"]["rises"]  # the drift alone rises
    assert against["rises"] and against["ci95"][0] < 0.1 < against["ci95"][1]
    assert "failure minus control" in summary_text({**paired, "suite": "s", "layer": 1, "metric": "z",
                                                    "attempt": "reply"})


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "episodes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_shipped_episode_configs_load(path):
    config = load_section(EpisodeConfig, path)
    assert config.out and config.control and config.feedback  # each ships with a control arm
