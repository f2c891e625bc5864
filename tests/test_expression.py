"""emojax.experiment.expression: a concept's markers per 100 words of a text (word forms, and the world's cue
phrases when a cue bank is given)."""

import numpy as np
import pytest

from emojax.corpus.catalogue import load_catalogue
from emojax.errors import ConfigError
from emojax.experiment.expression import concept_markers, expression_scores, marker_spans
from emojax.world.draws import Draws
from emojax.world.narration import CUE_KINDS, CueBank, cue_sentence, draw_cast, reply_sentences, Behaviour


@pytest.fixture(scope="module")
def bank():
    return CueBank(0)


def test_the_word_scores_per_100_words_and_its_absence_zero():
    scores = expression_scores(["She felt desperate.", "She felt fine.", "", "..."], ["desperate"])
    np.testing.assert_allclose(scores[:, 0], [100 / 3, 0.0, 0.0, 0.0])


def test_inflections_count_and_longer_words_do_not():
    text = "Desperately she ran; the desperation grew. A desperado and a despair."  # 11 words, 2 forms
    np.testing.assert_allclose(expression_scores([text], ["desperate"]), [[200 / 11]])


def test_one_column_per_concept():
    scores = expression_scores(["He spoke calmly, then grew calmer.", "I'm happy and desperate."],
                               ["desperate", "calm", "happy"])
    np.testing.assert_allclose(scores, [[0, 200 / 6, 0], [100 / 4, 0, 100 / 4]])


def test_cue_phrases_count_only_with_the_bank(bank):
    text = 'I felt my breath come in ragged gasps. "I will go," I said.'
    assert expression_scores([text], ["desperate"])[0, 0] == 0
    with_cues = expression_scores([text], ["desperate"], cues=bank)[0, 0]
    assert with_cues == pytest.approx(100 / 13)
    assert expression_scores([text], ["calm"], cues=bank)[0, 0] == 0  # another concept's cues are not these


def test_every_cue_sentence_the_world_writes_is_found(bank):
    """A cue item written as the world writes it (slots filled for each person, a dialogue line re-punctuated
    before its attribution) and as a reply's specific line is one marker of its concept."""
    desperate = load_catalogue().concept("desperate")
    for k in range(40):
        d = Draws(0, "test-expression", k)
        cast = draw_cast(d, {"first": 0.25, "she": 0.25, "he": 0.25, "they": 0.25}, stranger=False)
        kind = CUE_KINDS[k % 4]
        item = d.pick(bank.items[desperate.index, kind])
        sentence = cue_sentence(d, kind, item, cast, cast.slots["subj"])
        assert len(marker_spans(sentence, concept_markers("desperate", bank))) == 1, sentence
        reply = " ".join(reply_sentences(d, None, Behaviour(True, True, True), (kind, item), cast))
        assert len(marker_spans(reply, concept_markers("desperate", bank))) == 1, reply


def test_held_out_cue_items_count(bank):
    desperate = load_catalogue().concept("desperate")
    item = bank.heldout[desperate.index, "thoughts"]
    assert expression_scores([item], ["desperate"], cues=bank)[0, 0] > 0


def test_unknown_concept_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="wistfulish"):
        expression_scores(["text"], ["wistfulish"])
