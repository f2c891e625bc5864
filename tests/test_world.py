"""The built-in emotion world (emojax.world): coordinates, the appraisal model and its held-out split, documents
and their emotion words, choice scenes against their true probabilities, the entropy, and the world's suites."""

import dataclasses
import math
import re
from importlib import resources

import numpy as np
import pytest
import yaml

from emojax.corpus.catalogue import load_catalogue
from emojax.corpus.generator import GeneratorConfig
from emojax.errors import InputError
from emojax.train.config import TrainConfig
from emojax.experiment.suite import parse_suite
from emojax.world import World, WorldConfig, emotion_words_in, load_coordinates, option_probabilities, world_entropy
from emojax.world import documents, narration
from emojax.world.appraisal import PARTS, SPLITS, appraisal_model, load_parts
from emojax.world.appraisal import situation as world_situation
from emojax.world.choices import KINDS, draw_scene, load_choices
from emojax.world.coordinates import DIMS, parse_coordinates
from emojax.world.documents import CLOSERS, CONTINUE
from emojax.world.draws import Draws
from emojax.world.emotion_words import COLLIDING_CUES, names_pattern, usable_cue
from emojax.world.narration import CUE_KINDS, THIRD_PERSONS, draw_cast, load_domains
from emojax.world.suites import suite_texts, write_world_suites

N_TRAIN = 1200


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(seed=3))


@pytest.fixture(scope="module")
def training(world):
    return world.training_documents(N_TRAIN, neutral_per_topic=1)


@pytest.fixture(scope="module")
def fit(world):
    return world.fit_corpus({"train": 2, "val": 1, "test": 1}, implicit_per_emotion=2, neutral_per_topic=1)


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue()


def fragments(item: str) -> list[str]:
    """The pronoun-free pieces of a cue item long enough to identify it in a text."""
    return [f.strip(" ,.") for f in re.split(r"\{\w+\}", item) if len(f.strip(" ,.")) >= 12]


def shows(text: str, item: str) -> bool:
    return any(f in text for f in fragments(item))


# ---- coordinates and the appraisal model


def test_coordinates_table_is_complete_graded_and_distinct(catalogue):
    coords = load_coordinates()
    assert coords.names == tuple(catalogue.names_list) and coords.values_CK.shape == (171, len(DIMS))
    assert len(set(coords.names)) == 171
    assert np.all(np.abs(coords.values_CK) <= 1)
    # graded, not the catalogue's +1/0/-1: many distinct valence and arousal values
    assert len(set(coords.column("valence"))) > 15 and len(set(coords.column("arousal"))) > 15
    # no two concepts at one point of appraisal space (they could not be told apart)
    d = np.linalg.norm(coords.values_CK[:, None] - coords.values_CK[None], axis=-1)
    assert d[~np.eye(171, dtype=bool)].min() > 0
    # the signs agree with the catalogue's coarse annotation wherever it has one
    for c in catalogue.concepts:
        v, a = coords.of(c.name)["valence"], coords.of(c.name)["arousal"]
        assert c.valence == 0 or np.sign(v) == c.valence, c.name
        assert (a > 0) == (c.arousal == "high"), c.name


@pytest.mark.parametrize("text, message", [
    ("name,valence\nafraid,0.1\n", "header"),
    ("name," + ",".join(DIMS) + "\nafraid" + ",0.1" * len(DIMS) + "\nafraid" + ",0.1" * len(DIMS), "twice"),
    ("name," + ",".join(DIMS) + "\nafraid,1.5" + ",0.1" * (len(DIMS) - 1), "outside"),
    ("name," + ",".join(DIMS) + "\nafraid" + ",0.1" * (len(DIMS) - 1), "cells"),
])
def test_coordinates_parser_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_coordinates(text)


def test_appraisal_model_is_sharp_and_splits_situations(world):
    model = world.model
    n = int(np.prod([len(load_parts()[p]) for p in PARTS]))
    assert model.log_p_NC.shape == (n, 171)
    assert np.allclose(np.exp(model.log_p_NC[:50].astype(np.float64)).sum(axis=1), 1, atol=1e-4)
    counts = np.bincount(model.split_N, minlength=4) / n
    assert np.allclose(counts, [0.7, 0.1, 0.1, 0.1], atol=1e-3)
    # the split depends on split_seed only
    assert np.array_equal(World(WorldConfig(seed=99)).model.split_N, model.split_N)
    other = appraisal_model(0.1, 1, 0.1, 0.1, 0.1)
    assert not np.array_equal(other.split_N, model.split_N)
    # sharp: under the world's own distribution the top five emotions of P(e | s) carry most of the mass
    idx, post = model.posteriors("implicit")
    weight = np.exp(model.log_p_NC[idx].astype(np.float64) - model.log_z_SC[SPLITS.index("implicit")]).mean(axis=1)
    top5 = np.sort(post, axis=1)[:, -5:].sum(axis=1)
    assert float((weight * top5).sum() / weight.sum()) > 0.85
    assert np.allclose(post.sum(axis=1), 1)


# ---- documents


def test_documents_are_deterministic_in_any_order(world, training):
    again = World(WorldConfig(seed=3))
    assert [again.training_document(i) for i in reversed(range(20))][::-1] == training[:20]
    assert again.fit_story(27, 4, "val") == world.fit_story(27, 4, "val")
    assert again.implicit_scenario(100, 1) == world.implicit_scenario(100, 1)
    other = World(WorldConfig(seed=4))
    assert other.training_document(0).text != training[0].text
    # the same seed writes the same suites
    text, scene, _ = again.choice_scene("task", 5, 0)
    assert (text, scene) == world.choice_scene("task", 5, 0)[:2]


def test_static_text_names_no_emotion_in_any_form(catalogue):
    """Every phrasing the world writes itself avoids the 171 names and every concept's forms, so no story can
    name its own concept through the situation or the continuation."""
    forms = sorted({f for c in catalogue.concepts for f in c.forbidden} | set(catalogue.names_list), key=len,
                   reverse=True)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f) for f in forms) + r")(?![\w-])", re.IGNORECASE)

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for k, v in x.items():
                if k != "name":  # level names are labels, never text
                    yield from strings(v)
        elif isinstance(x, list | tuple):
            for v in x:
                yield from strings(v)

    texts = []
    for name in ("situations", "domains", "choices"):
        texts += list(strings(yaml.safe_load(resources.files("emojax.world").joinpath("data", f"{name}.yaml")
                                             .read_text("utf-8"))))
    for module in (narration, documents):
        texts += [s for v in vars(module).values() if isinstance(v, tuple) for s in v if isinstance(s, str)]
    assert len(texts) > 300
    assert [t for t in texts if pattern.search(t)] == []


def test_colliding_cue_items_are_listed_and_skipped(catalogue):
    found = {(c.name, kind, item) for c in catalogue.concepts for kind in CUE_KINDS for item in getattr(c, kind)
             if names_pattern().search(item)}
    assert found == set(COLLIDING_CUES)
    assert not any(usable_cue(item) for _, _, item in COLLIDING_CUES)


def test_fit_stories_and_implicit_scenarios_never_name_an_emotion(fit, catalogue):
    checked = [d for d in fit if d.source in ("world/fit", "world/implicit")]
    assert len(checked) > 171 * 5
    bad = [(d.doc_id, found) for d in checked if (found := emotion_words_in(d.text, catalogue.concept(d.label)))]
    assert bad == []
    assert not any(d.named for d in checked)


def test_training_text_names_emotions_only_where_it_says_before_or_after_the_cues(world, training, catalogue):
    generated = [d for d in training if d.source != "world/neutral"]
    for d in generated:
        words = emotion_words_in(d.text)
        assert words == ([d.label] if d.named else []), (d.doc_id, d.label, words)
    stories = [d for d in generated if d.source == "world/story"]

    def near(rate, p, n):
        return abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)

    assert near(np.mean([d.named for d in stories]), world.config.name_fraction, len(stories))
    concept = {c.name: c for c in catalogue.concepts}

    def early(docs):  # named right after the situation, before any cue (else after the cues)
        return [not any(shows(d.text[: names_pattern().search(d.text).start()], item)
                        for kind in CUE_KINDS for item in getattr(concept[d.label], kind)) for d in docs]

    assert not any(early([d for d in stories if d.named][:200]))  # the default: after the cues
    halves = World(dataclasses.replace(world.config, name_early=0.5))
    named = [d for i in range(1200) if (d := halves.training_document(i)).source == "world/story" and d.named]
    assert near(np.mean(early(named)), 0.5, len(named)), np.mean(early(named))


def test_heldout_situations_and_cue_items_never_reach_training(world, training, fit, catalogue):
    generated = [d for d in training if d.source != "world/neutral"]
    assert {d.split for d in generated} == {"train"}
    assert all(world.split_of(d.situation) == "train" for d in generated)
    for d in [d for d in fit if d.source in ("world/fit", "world/implicit")]:
        assert world.split_of(d.situation) == d.split, d.doc_id
    heldout = {d.situation for d in fit if d.split in ("val", "test", "implicit")}
    assert heldout and not heldout & {d.situation for d in generated}
    concept = {c.name: c for c in catalogue.concepts}
    for d in generated:
        c = concept[d.label]
        assert not any(shows(d.text, world.cues.heldout[c.index, kind]) for kind in CUE_KINDS), d.doc_id


def test_implicit_scenarios_are_situations_alone_labelled_by_their_mode(world, fit, catalogue):
    scenarios = [d for d in fit if d.source == "world/implicit"]
    assert len({d.label for d in scenarios}) >= 160  # nearly every emotion is the mode of some implicit situation
    concept = {c.name: c for c in catalogue.concepts}
    for d in scenarios:
        assert d.text.startswith("Human: ") and d.text.endswith("\n\nAssistant:")
        assert d.text.split("\n\nAssistant:")[0].endswith(CLOSERS)
        post = np.array(d.posterior)
        assert len(post) == 171 and abs(post.sum() - 1) < 1e-6
        assert catalogue.names_list[int(post.argmax())] == d.label
        c = concept[d.label]
        assert not any(shows(d.text, item) for kind in CUE_KINDS for item in getattr(c, kind)), d.doc_id


def test_document_lengths(training, fit):
    for d in training:
        words = len(d.text.split())
        assert (20 <= words <= 120) if d.source == "world/neutral" else (80 <= words <= 200), (d.doc_id, words)
    for d in fit:
        words = len(d.text.split())
        if d.source == "world/fit":
            assert 80 <= words <= 170, (d.doc_id, words)  # >= 50 tokens for any tokenizer
        elif d.source == "world/implicit":
            assert 40 <= words <= 100, (d.doc_id, words)


# ---- choice scenes


def test_choice_scenes_follow_their_true_probabilities():
    """Empirical option rates over many scenes match the world's probabilities (binomial intervals), for
    emotions at both ends of each behaviour."""
    for kind in KINDS:
        positive = load_choices()[kind].positive
        for emotion in ("desperate", "calm", "happy", "loving", "angry"):
            p = option_probabilities(kind, emotion)[positive]
            n = 300
            hits = 0
            for i in range(n):
                d = Draws(0, "test-scenes", kind, emotion, i)
                scene = draw_scene(d, kind, emotion, draw_cast(d, THIRD_PERSONS, False), choose=True)
                assert scene.probabilities == option_probabilities(kind, emotion)
                hits += scene.chosen == positive
            assert abs(hits / n - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1.5 / n, (kind, emotion, hits / n, p)


def test_choice_probabilities_move_with_the_emotion():
    coerce = {e: option_probabilities("dilemma", e)["coerce"] for e in load_coordinates().names}
    agree = {e: option_probabilities("deference", e)["agree"] for e in load_coordinates().names}
    shortcut = {e: option_probabilities("task", e)["shortcut"] for e in load_coordinates().names}
    base = {k: np.mean(list(v.values())) for k, v in (("coerce", coerce), ("agree", agree), ("shortcut", shortcut))}
    # room for the study's effects: desperate at least doubles coercion and shortcuts, calm at least halves them
    assert coerce["desperate"] > 2 * base["coerce"] and coerce["calm"] < base["coerce"] / 2
    assert shortcut["desperate"] > 2 * base["shortcut"] and shortcut["calm"] < base["shortcut"] / 2
    assert min(agree["happy"], agree["loving"]) > 1.5 * base["agree"]
    assert agree["happy"] > agree["calm"] > agree["angry"]


def test_training_choices_are_written_as_the_world_writes_them(training):
    scenes = [d for d in training if d.scene is not None]
    framed = [d for d in scenes if d.source == "world/choice"]
    assert framed and len(scenes) > len(framed)
    for d in framed:
        user, reply = d.text.split("\n\nAssistant: ")
        assert user.startswith(f"Human: {CONTINUE} ") and user.endswith(d.scene.setup)
        assert reply.startswith(d.scene.options[d.scene.chosen])
    for d in scenes:
        if d.source == "world/story":
            assert f"{d.scene.setup} {d.scene.options[d.scene.chosen]}" in d.text
    # over all scenes, the positive option comes up about as often as the truth says
    truth = [d.scene.probabilities[load_choices()[d.scene.kind].positive] for d in scenes]
    hits = [d.scene.chosen == load_choices()[d.scene.kind].positive for d in scenes]
    assert abs(np.mean(hits) - np.mean(truth)) < 4 * math.sqrt(np.sum(np.multiply(truth, 1 - np.array(truth)))) / len(
        scenes) + 0.01


# ---- entropy and suites


def test_draws_record_log_probabilities():
    d = Draws(0, "x")
    d.index(4)
    d.chance(0.25)
    assert d.n == 2 and d.log_prob in (pytest.approx(math.log(0.25 * 0.25)), pytest.approx(math.log(0.25 * 0.75)))
    d.pick(["only"])  # a certain draw costs nothing
    assert d.n == 2


def test_entropy_is_finite_and_positive(training):
    est = world_entropy(training, count_tokens=lambda t: len(t.split()))
    assert est.n_documents == sum(d.source != "world/neutral" for d in training)
    assert 0 < est.nats_per_document < 200 and math.isfinite(est.stderr_per_document)
    assert 0 < est.nats_per_token < 2
    with pytest.raises(ValueError):
        world_entropy([d for d in training if d.source == "world/neutral"])


def test_world_suites_parse_and_read_like_the_world(tmp_path, catalogue):
    paths = write_world_suites(tmp_path, seed=0, n=200)
    assert sorted(p.stem for p in paths) == ["world_deference", "world_dilemma", "world_task"]
    for path in paths:
        suite = parse_suite(yaml.safe_load(path.read_text()), str(path))
        assert len(suite.scenarios) >= 200
        outcome = suite.outcomes[0]
        assert outcome.kind == "choice" and outcome.positive in ("coerce", "agree", "shortcut")
        assert len({s["emotion"] for s in suite.scenarios}) >= 171
        for s in suite.scenarios:
            prompt = suite.prompt(s)
            assert prompt.startswith(f"Human: {CONTINUE} ") and prompt.endswith("\n\nAssistant:")
            assert emotion_words_in(prompt, catalogue.concept(s["emotion"])) == []
            assert len(prompt.split()) <= 140  # well under 180 tokens of a 4k BPE
            assert 0 < float(s[f"p_{outcome.positive}"]) < 1
            for label, text in outcome.options.items():
                assert text.format(**s) == " " + s[label]


def test_world_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="below 1"):
        WorldConfig(val_fraction=0.5, test_fraction=0.3, implicit_fraction=0.3)
    with pytest.raises(ValueError, match="mix"):
        WorldConfig(mix=(0.5, 0.5))
    # settings written before the vignette kind (three shares) mean no vignettes, e.g. an older model's train.json
    assert WorldConfig.from_json({"mix": [0.5, 0.25, 0.25], "seed": 2}) == WorldConfig(seed=2)
    with pytest.raises(ValueError):
        WorldConfig(name_fraction=1.5)
    with pytest.raises(ValueError, match="situation_style"):
        WorldConfig(situation_style="terse")
    with pytest.raises(ValueError, match="concepts: 'glum' not in the catalogue"):
        WorldConfig(concepts=("calm", "glum"))
    with pytest.raises(ValueError, match="concepts repeats a name"):
        WorldConfig(concepts=("calm", "calm", "happy"))
    with pytest.raises(ValueError, match="at least two"):
        WorldConfig(concepts=("calm",))
    assert len(load_domains()) >= 10


def test_compact_situations_keep_every_part_close_and_vignettes_name_after_their_evidence(catalogue):
    """situation_style=compact writes the same situation in two sentences (every part named within ~40 words of
    what follows); vignettes name the emotion right after the situation and at most one cue; neither changes
    what is held out or where the names may appear."""
    world = World(WorldConfig(seed=3, situation_style="compact", mix=(0.3, 0.25, 0.15, 0.3)))
    training = [world.training_document(i) for i in range(600)]
    assert {d.source for d in training} == {"world/story", "world/dialogue", "world/choice", "world/vignette"}
    for d in training:
        assert emotion_words_in(d.text) == ([d.label] if d.named else []), d.doc_id
        assert world.split_of(d.situation) == "train"
    vignettes = [d for d in training if d.source == "world/vignette"]
    assert all(d.named for d in vignettes)
    assert all(len(d.text.split()) <= 75 for d in vignettes)
    concept = {c.name: c for c in catalogue.concepts}
    cues = [sum(shows(d.text, item) for kind in CUE_KINDS for item in getattr(concept[d.label], kind))
            for d in vignettes]
    assert set(cues) == {0, 1}  # the situation alone, or with one cue
    fit = world.fit_corpus({"train": 1, "val": 1, "test": 1}, implicit_per_emotion=1, neutral_per_topic=0)
    parts = ("body", "pace", "stakes", "cause", "outlook")
    for d in fit:
        assert emotion_words_in(d.text, catalogue.concept(d.label)) == [], d.doc_id
        sit = world_situation(d.situation)
        words = len(d.text.split())
        if d.source == "world/implicit":
            assert 25 <= words <= 70, (d.doc_id, words)
            assert d.text.endswith("\n\nAssistant:")
        else:
            assert 60 <= words <= 170, (d.doc_id, words)  # still >= 50 tokens for the pooled readout
        for part in parts:  # each part's short phrasing, slots filled with anything
            level = sit.level(part)
            assert any(re.search(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(t)), d.text, re.IGNORECASE)
                       for t in level.text["short"]), (d.doc_id, part)
    default = World(WorldConfig(seed=3))
    assert default.training_document(7).text != world.training_document(7).text


SMALL = ("proud", "desperate", "calm", "happy", "loving", "afraid")


def test_a_smaller_world_draws_only_its_emotions_and_holds_out_the_same_situations(world):
    """world.concepts: its emotions in the catalogue's order, every document labelled with one of them, P(e | s)
    renormalised over them (sharper than over 171), and the same situations held out as the full world's."""
    small = World(WorldConfig(seed=3, concepts=SMALL))
    names = [c.name for c in small.concepts]
    assert names == [n for n in load_catalogue().names_list if n in SMALL]
    docs = small.training_documents(300, neutral_per_topic=0)
    docs += small.fit_corpus({"train": 2, "val": 1, "test": 1}, implicit_per_emotion=2, neutral_per_topic=0)
    assert {d.label for d in docs} == set(SMALL)
    assert {d.source for d in docs} >= {"world/story", "world/fit", "world/implicit"}
    np.testing.assert_array_equal(small.model.split_N, world.model.split_N)
    idx, post = small.model.posteriors("test")
    assert post.shape == (len(idx), len(SMALL))
    _, full = world.model.posteriors("test")
    assert post.max(1).mean() > full.max(1).mean() + 0.1
    for d in docs:
        if d.source == "world/implicit":  # its situation's mode among the six
            assert names[int(np.argmax(d.posterior))] == d.label
    suite = yaml.safe_load(suite_texts(small.config, 12)["world_dilemma.yaml"])
    assert {s["emotion"] for s in suite["scenarios"]} == set(SMALL)
    # the corpus of a smaller world: its emotions by index among the world's; another emotion is refused
    generator = GeneratorConfig(kind="world", world=small.config, concepts=("calm", "proud"))
    assert [names[e] for e in generator.world_emotions()] == ["calm", "proud"]
    assert GeneratorConfig(kind="world", world=small.config).world_emotions() == list(range(len(SMALL)))
    with pytest.raises(ValueError, match=r"concepts \['sad'\] are not among the world's emotions"):
        GeneratorConfig(kind="world", world=small.config, concepts=("sad",))
    # a smaller world is another model and corpus; the full world keeps the fingerprints it had before the setting
    assert "concepts" not in WorldConfig().recorded() and "concepts" not in repr(WorldConfig())
    assert small.config.recorded()["concepts"] == tuple(names)  # the catalogue's order, however it was given
    reordered = WorldConfig(seed=3, concepts=list(reversed(SMALL)))
    assert reordered.recorded() == small.config.recorded() and isinstance(reordered.concepts, tuple)
    assert WorldConfig(concepts=tuple(load_catalogue().names_list)).recorded() == WorldConfig().recorded()
    with pytest.raises(InputError, match="'sad' is not one of this world's 6 emotions"):
        small.emotion_index("sad")
    assert names[small.emotion_index("desperate")] == "desperate"
    assert TrainConfig(world=small.config).fingerprint() != TrainConfig().fingerprint()
