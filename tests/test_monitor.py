"""Monitoring: readings from the decode loop equal the fit's readout (concept_readout) of a separate forward's
captures, measured from the bank's center; streamed
chunks add up to the final readings; threshold rules raise alerts with the right positions."""

from __future__ import annotations

import numpy as np
import pytest

import emojax
from emojax.concepts.evaluate import concept_readout
from emojax.errors import InputError
from emojax.models.config import ModelConfig
from emojax.steer import AlertTracker, DecodeConfig, Decoder, Interventions, Readout, Rule, find_alerts

CONFIG = ModelConfig(architecture="llama", vocab_size=97, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2,
                     head_dim=10, d_mlp=64)
L, D, C = CONFIG.n_layers, CONFIG.d_model, 5
SMALL = DecodeConfig(prompt_buckets=(8,), new_token_buckets=(16,), stream_chunk=4)


@pytest.fixture(scope="module")
def lm():
    return emojax.random_model(CONFIG, seed=5)


@pytest.fixture(scope="module")
def dec(lm):
    return Decoder(lm, SMALL)


def _prompts(seed=0, lengths=(6, 2, 8)):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens, mask = np.zeros((len(lengths), T), np.int32), np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, T - n:], mask[b, T - n:] = rng.integers(1, CONFIG.vocab_size, n), 1
    return tokens, mask


def _concepts(seed=1):
    return np.random.default_rng(seed).normal(size=(C, D)).astype(np.float32)


def _expected(lm, gen, index, concepts, metric, center=None, **kwargs):
    seq, valid = np.asarray(gen.tokens), np.asarray(gen.valid)
    hidden = np.asarray(lm(seq, valid, capture=(index,), **kwargs).hidden[0])
    return concept_readout(hidden, concepts, center, metric) * valid[..., None]


def test_readings_equal_projections_of_a_separate_forward(lm, dec):
    tokens, mask = _prompts()
    concepts = _concepts()
    center = np.random.default_rng(9).normal(size=D).astype(np.float32)  # readings are cos(x - center, v)
    for index in (0, 2, L):  # embeddings, a middle layer, after the final norm (one compiled loop for all)
        gen = dec.generate(tokens, mask, max_new_tokens=9, readout=Readout(concepts=concepts, index=index,
                                                                             center=center))
        readings = np.asarray(gen.readings)
        assert readings.shape == (3, gen.prompt_columns + 16, C)
        np.testing.assert_allclose(readings, _expected(lm, gen, index, concepts, "cosine", center), atol=1e-4)
        # every prompt and generated token was read, including the last generated one
        valid = np.asarray(gen.valid)
        assert (np.abs(readings).sum(-1)[valid] > 0).all()
        assert int(valid[:, gen.prompt_columns:].sum()) == 27
    assert dec.trace_count == 1


def test_readings_see_the_steered_stream(lm, dec):
    tokens, mask = _prompts(seed=2)
    concepts = _concepts(seed=3)
    v = concepts[1] * 0.5
    iv = Interventions.empty(3, L, D).add(v, layers=(2,), strengths=[0.0, 1.0, 2.0], positions="generated")
    gen = dec.generate(tokens, mask, max_new_tokens=9, interventions=iv,
                       readout=Readout(concepts=concepts, index=2, metric="dot"))
    generated = np.zeros(gen.tokens.shape, np.float32)
    generated[:, gen.prompt_columns:] = 1
    want = _expected(lm, gen, 2, concepts, "dot", interventions=iv, generated=generated)
    np.testing.assert_allclose(np.asarray(gen.readings), want, atol=1e-4)


def test_readings_stream_in_chunks_while_decoding(lm, dec):
    tokens, mask = _prompts(seed=4)
    concepts = _concepts(seed=5)
    chunks = []
    readout = Readout(concepts=concepts, index=1, metric="cosine")
    gen = dec.generate(tokens, mask, max_new_tokens=10, readout=readout,
                       on_readings=lambda pos, r: chunks.append((pos, r)))
    assert len(chunks) == 1 + 3  # the prompt, then generated tokens 4 at a time (4, 4, 2)
    positions = gen.positions()
    readings = np.asarray(gen.readings)
    seen = np.zeros(positions.shape, bool)
    for pos, r in chunks:
        for b in range(3):
            for t in range(pos.shape[1]):
                if pos[b, t] >= 0:
                    col = int(np.nonzero(positions[b] == pos[b, t])[0][0])
                    assert not seen[b, col]
                    seen[b, col] = True
                    np.testing.assert_allclose(r[b, t], readings[b, col], atol=1e-6)
    np.testing.assert_array_equal(seen, np.asarray(gen.valid))
    # an alert tracker fed with the chunks finds what it finds on the whole readings
    rules = [Rule("c0", 0.1, 2), Rule("c3", -0.1, 1, above=False)]
    names = [f"c{i}" for i in range(C)]
    tracker = AlertTracker(rules, names)
    for pos, r in chunks:
        tracker.feed(pos, r)
    order = lambda alerts: sorted(alerts, key=lambda a: (a.row, a.rule, a.start))  # noqa: E731
    assert order(tracker.alerts()) == order(find_alerts(readings, positions, rules, names))
    assert tracker.alerts()


def test_new_concepts_and_layers_do_not_recompile(lm):
    dec = Decoder(lm, SMALL)
    tokens, mask = _prompts(seed=6)
    for seed, index in enumerate((2, 0, L)):
        gen = dec.generate(tokens, mask, max_new_tokens=5 + seed, on_readings=lambda p, r: None,
                           readout=Readout(concepts=_concepts(seed), index=index, metric="cosine"))
    assert dec.trace_count == 1
    np.testing.assert_allclose(np.asarray(gen.readings), _expected(lm, gen, L, _concepts(2), "cosine"), atol=1e-4)


def test_rules_parse_and_raise_alerts_with_positions():
    assert Rule.parse("desperate>0.3:3") == Rule("desperate", 0.3, 3, True)
    assert Rule.parse("desperate > 0.3 for 3 tokens") == Rule("desperate", 0.3, 3, True)
    assert Rule.parse("calm<-0.2") == Rule("calm", -0.2, 1, False)
    for bad in ("desperate", "desperate>>1", "desperate>x", "desperate>0.3:0"):
        with pytest.raises(InputError):
            Rule.parse(bad)
    names = ["calm", "desperate"]
    values = np.array([0.1, 0.4, 0.5, 0.2, 0.35, 0.31, 0.33, 0.9, 0.0], np.float32)
    readings = np.zeros((2, 10, 2), np.float32)
    readings[0, 1:, 1] = values  # column 0 is padding
    readings[1, :9, 1] = values[::-1]
    positions = np.stack([np.r_[-1, np.arange(9)], np.r_[np.arange(9), -1]])
    alerts = find_alerts(readings, positions, [Rule.parse("desperate>0.3:3")], names)
    assert [(a.row, a.start, a.trigger, a.end) for a in alerts] == [(0, 4, 6, 7), (1, 1, 3, 4)]
    assert alerts[0].peak == pytest.approx(0.9)
    # a run broken by a chunk boundary is still one run
    tracker = AlertTracker([Rule.parse("desperate>0.3:3")], names)
    tracker.feed(positions[:, :6], readings[:, :6])
    tracker.feed(positions[:, 6:], readings[:, 6:])
    assert tracker.alerts() == alerts
    with pytest.raises(InputError, match="not monitored"):
        AlertTracker([Rule.parse("angry>0.1")], names)
