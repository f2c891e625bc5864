"""The concept catalogue and the built-in story generator."""

import collections
import itertools

import pytest

from emojax.corpus.catalogue import load_catalogue
from emojax.corpus.generator import GeneratorConfig, generate, story, validate_story


def sentences(text: str) -> list[str]:
    """Sentences of a story; a quotation (with its attribution) stays inside its sentence."""
    out, start, in_quote = [], 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            in_quote = not in_quote
        elif ch in ".!?" and not in_quote and (i + 1 == len(text) or text[i + 1] == " "):
            out.append(text[start:i + 1].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue()


@pytest.fixture(scope="module")
def default_corpus():
    return list(generate(GeneratorConfig()))


def test_catalogue_has_every_concept_with_cues_and_annotations(catalogue):
    assert len(catalogue.concepts) == 171 and len(catalogue.topics) == 100
    assert catalogue.concepts[0].name == "afraid" and catalogue.concepts[-1].name == "worthless"
    for c in catalogue.concepts:
        assert c.valence in (-1, 0, 1) and c.arousal in ("high", "low"), c.name
        for kind in ("actions", "body", "dialogue", "thoughts"):
            cues = getattr(c, kind)
            assert len(set(cues)) >= 4, (c.name, kind)
            for cue in cues:
                assert not c.forbidden_pattern.search(cue), (c.name, kind, cue)
        assert c.scenarios, c.name
    # valence really separates the catalogue: both signs are well represented
    counts = collections.Counter(c.valence for c in catalogue.concepts)
    assert counts[1] > 40 and counts[-1] > 60


def test_every_story_passes_the_validator(catalogue, default_corpus):
    stories = [d for d in default_corpus if d.source == "generated/story"]
    assert len(stories) == 171 * 100 * 2
    bad = [(d.doc_id, p) for d in stories if (p := validate_story(d.text, catalogue.concept(d.label)))]
    assert not bad, bad[:5]


def test_validator_rejects_the_concept_word_and_its_forms(catalogue):
    concept = catalogue.concept("angry")
    text = " ".join(["word"] * 90)
    assert validate_story(text, concept) == []
    assert validate_story(text + " She was Angrily quiet.", concept)
    assert validate_story(text + " His anger showed.", concept)
    assert validate_story("too short", concept)
    at_ease = catalogue.concept("at ease")
    assert validate_story(text + " she felt at ease.", at_ease)


def test_fewer_than_one_percent_of_sentences_repeat(default_corpus):
    counts = collections.Counter(itertools.chain.from_iterable(sentences(d.text) for d in default_corpus))
    total = sum(counts.values())
    repeated = sum(n for n in counts.values() if n > 1)
    assert total > 200_000
    assert repeated / total < 0.01, f"{repeated} of {total} sentences repeat"


def test_generation_is_identical_for_the_same_seed(catalogue):
    cfg = GeneratorConfig(concepts=("desperate", "calm"), n_topics=7)
    assert list(generate(cfg)) == list(generate(cfg))
    other = list(generate(GeneratorConfig(concepts=("desperate", "calm"), n_topics=7, seed=1)))
    assert [d.text for d in other] != [d.text for d in generate(cfg)]


def test_stories_mix_first_and_third_person(default_corpus):
    stories = [d.text for d in default_corpus if d.source == "generated/story"][:2000]
    first = sum(1 for s in stories if " I " in s or s.split(" ", 1)[0] == "I")
    assert 0.2 < first / len(stories) < 0.6


def test_neutral_dialogues_and_implicit_scenarios(catalogue, default_corpus):
    neutral = [d for d in default_corpus if d.label == "neutral"]
    assert len(neutral) == 300 and all(d.text.startswith("Human: ") and "\n\nAssistant: " in d.text for d in neutral)
    implicit = [d for d in default_corpus if d.source == "generated/implicit"]
    assert {d.label for d in implicit} == set(catalogue.names_list)
    for d in implicit:
        assert not catalogue.concept(d.label).forbidden_pattern.search(d.text), d.doc_id


def test_story_is_one_paragraph_about_its_topic(catalogue):
    concept, topic = catalogue.concept("desperate"), catalogue.topics[3]
    doc = story(concept, topic, 0, seed=0, catalogue=catalogue)
    assert "\n" not in doc.text
    assert any(piece in doc.text for piece in topic.settings + topic.details + topic.events)
