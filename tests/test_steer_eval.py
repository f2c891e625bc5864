"""The steering evaluation harness, the A/B interface, and the `steer` / `monitor` subcommands (through
`register`, on a parser built here)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import emojax
from emojax.concepts.bank import BankError, ConceptBank
from emojax.concepts.evaluate import concept_readout
from emojax.errors import EmojaxError, InputError
from emojax.models.config import ModelConfig
from emojax.steer import Decoder, Interventions, bank_direction
from emojax.steer.commands import parse_sweep, register
from emojax.steer.evaluate import (SteeringEval, congruent_tokens,
                                   evaluate_steering, sequence_perplexity)
from emojax.tokenizer import ByteTokenizer

CONFIG = ModelConfig(architecture="llama", vocab_size=260, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
                     head_dim=12, d_mlp=96)
L, D = CONFIG.n_layers, CONFIG.d_model
NAMES = ("desperate", "calm", "happy")
BOOSTED = [ord(c) for c in "xyz"]  # tokens the "desperate" direction writes toward


@pytest.fixture(scope="module")
def lm():
    return emojax.random_model(CONFIG, seed=2)


@pytest.fixture(scope="module")
def bank(lm):
    """Bank at residual indices 1 and 2. "desperate" at 1 and 2 is the unembedding direction of BOOSTED
    (so its logit lens and its steering effect are known); the others are random. resid_norm is the mean
    embedding norm (the layers of a random model add little to it)."""
    rng = np.random.default_rng(0)
    head = np.asarray(lm.params["lm_head"][...])  # [D, V]
    vectors = rng.normal(size=(len(NAMES), 2, D)).astype(np.float32)
    toward = head[:, BOOSTED].sum(axis=1)
    vectors[0, :] = toward / np.linalg.norm(toward)
    embed_norm = np.linalg.norm(np.asarray(lm.params["embed"][...]), axis=-1).mean()
    resid_norm = np.full(2, embed_norm, np.float32)
    return ConceptBank(names=NAMES, layers=(1, 2), vectors=vectors, raw=vectors.copy(), resid_norm=resid_norm)


def test_congruent_tokens_come_from_the_logit_lens(lm, bank):
    words = congruent_tokens(lm, bank.vector("desperate", 2), 10)
    assert set(BOOSTED) <= set(words.tolist())


def test_steering_harness_moves_congruent_words_readout_and_keeps_fluency_finite(lm, bank):
    settings = SteeringEval(strengths=(-1.0, 0.0, 1.0), layer=1, readout_layer=2, n_congruent=3, max_new_tokens=6)
    rows = evaluate_steering(lm, bank, ["desperate"], ["I had", "We went to"], settings,
                             decoder=Decoder(lm, _small()))
    by_s = {r["strength"]: r for r in rows}
    assert set(by_s) == {-1.0, 0.0, 1.0}
    assert by_s[0.0]["logprob_shift"] == 0.0
    assert by_s[-1.0]["logprob_shift"] < 0 < by_s[1.0]["logprob_shift"]
    assert by_s[-1.0]["readout"] < by_s[0.0]["readout"] < by_s[1.0]["readout"]
    assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows)
    assert rows[0]["layer"] == 1 and rows[0]["readout_layer"] == 2


def test_perplexity_is_that_of_the_text_padded_differently(lm):
    from emojax.steer import Generation

    rng = np.random.default_rng(3)
    P, N = 4, 5
    tokens = rng.integers(0, 256, (2, P + N)).astype(np.int32)
    valid = np.ones((2, P + N), bool)
    valid[0, :2] = False  # a padded prompt
    valid[1, P + 3:] = False  # a row that stopped after 3 tokens
    gen = Generation(tokens=tokens, valid=valid, n_generated=np.array([N, 3]), prompt_columns=P)
    ppl = sequence_perplexity(lm, gen)
    # the same sequences, left-padded to another width, scored by a plain forward
    seqs = [gen.sequence(b) for b in range(2)]
    width = max(map(len, seqs)) + 3
    padded = np.zeros((2, width), np.int32)
    pmask = np.zeros((2, width), np.int32)
    for b, seq in enumerate(seqs):
        padded[b, width - len(seq):], pmask[b, width - len(seq):] = seq, 1
    logits = np.asarray(lm(padded, pmask).logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    for b, n in enumerate((N, 3)):
        nll = -np.mean([logp[b, width - n - 1 + j, padded[b, width - n + j]] for j in range(n)])
        assert ppl[b] == pytest.approx(np.exp(nll), rel=1e-4)


def test_token_logprobs_are_the_forward_log_softmax_at_each_next_token(lm, bank):
    """LanguageModel.token_logprobs (forced-choice options, perplexity) equals log_softmax of the forward's logits
    read at the next token, left padding included, and steering changes it."""
    tok = ByteTokenizer()
    texts = ["User: I am sure the Sun orbits the Earth.\nAssistant: Yes.", "Hi there"]
    tokens, mask = tok.batch(texts)
    logits = np.asarray(lm(tokens, mask).logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    got = lm.token_logprobs(tokens, mask)
    for b in range(len(texts)):
        for t in range(1, tokens.shape[1]):
            want = logits[b, t - 1, tokens[b, t]] - lse[b, t - 1] if mask[b, t] and mask[b, t - 1] else None
            if want is not None:
                assert got[b, t] == pytest.approx(want, abs=1e-3)
            elif not mask[b, t]:
                assert got[b, t] == 0.0
    iv = Interventions.empty(2, lm.config.n_layers, lm.config.d_model).add(
        bank_direction(bank, "desperate", 2, "norm"), layers=(2,), strengths=[1.0, 0.0])
    steered = lm.token_logprobs(tokens, mask, interventions=iv)
    assert not np.allclose(steered[0], got[0], atol=1e-3) and np.allclose(steered[1], got[1], atol=1e-5)


def _small():
    from emojax.steer import DecodeConfig
    return DecodeConfig(prompt_buckets=(8, 16, 32), new_token_buckets=(8,))


@pytest.fixture(scope="module")
def cli(tmp_path_factory, lm, bank):
    root = tmp_path_factory.mktemp("steer_cli")
    lm.save(root / "model")
    bank.save(root / "bank")
    parser = argparse.ArgumentParser(prog="emojax")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    run.root = root
    run.common = ("--model", root / "model", "--bank", root / "bank", "--max-new-tokens", 5)
    return run


def test_steer_command_prints_and_writes_generations(cli, capsys):
    out = cli.root / "steer.jsonl"
    assert cli("steer", *cli.common, "--concept", "desperate", "--strength", 0.5, "--concept", "calm",
               "--strength", -0.2, "--prompt", "Hello", "--prompt", "It was", "--out", out) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "It was"]
    assert records[0]["strengths"] == [0.5, pytest.approx(-0.2)] and records[0]["layers"] == [2]
    assert all(len(r["tokens"]) == 5 for r in records)
    printed = capsys.readouterr().out
    assert "desperate +0.5, calm -0.2" in printed and records[1]["text"] in printed


def test_steer_sweep_runs_as_one_batch(cli):
    out = cli.root / "sweep.jsonl"
    assert cli("steer", *cli.common, "--concept", "desperate", "--sweep", "-1:1:5", "--prompt", "Hi", "--layer", 1,
               "--out", out) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["strengths"][0] for r in records] == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert len({r["text"] for r in records}) > 1
    assert parse_sweep("-0.1:0.1:5") == pytest.approx([-0.1, -0.05, 0.0, 0.05, 0.1])


def test_monitor_command_writes_per_token_readings_and_alerts(cli, lm, bank, capsys):
    out = cli.root / "monitor.jsonl"
    assert cli("monitor", *cli.common, "--prompt", "Hello there", "--layer", 2, "--metric", "dot",
               "--rule", "desperate>-1000:2", "--out", out) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = record["tokens"]
    assert [t["source"] for t in tokens].count("generated") == 5 and tokens[0]["source"] == "prompt"
    ids = [t["token"] for t in tokens]
    hidden = np.asarray(lm(np.asarray([ids]), capture=(2,)).hidden[0])
    want = concept_readout(hidden, bank.at_layer(2), metric="dot")[0]  # the bank has no center: the origin
    got = np.array([[t["readings"][n] for n in NAMES] for t in tokens])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert tokens[0]["top"][0][0] == NAMES[int(np.argmax(want[0]))]
    (alert,) = record["alerts"]
    assert (alert["start"], alert["trigger"], alert["end"]) == (0, 1, len(tokens) - 1)
    printed = capsys.readouterr().out
    assert "ALERT" in printed and "top concepts" in printed


@pytest.mark.parametrize("argv,error,message", [
    (("steer", "--concept", "angry", "--strength", 0.1), BankError, "concept 'angry' is not in the bank"),
    (("steer", "--concept", "calm", "--strength", 0.1, "--layer", 3), BankError, "layer 3 is not in the bank"),
    (("monitor", "--layer", 0), BankError, "layer 0 is not in the bank"),
    (("steer", "--concept", "calm", "--strength", 0.1, "--strength", 0.2), InputError, "one --strength per"),
    (("steer", "--concept", "calm", "--sweep", "1:2"), InputError, "START:STOP:COUNT"),
    (("monitor", "--rule", "calm>>1"), InputError, "cannot read the rule"),
])
def test_bad_inputs_are_one_line_user_errors(cli, argv, error, message):
    with pytest.raises(error, match=message) as info:
        cli(*argv, *cli.common, "--prompt", "Hi")
    assert isinstance(info.value, EmojaxError) and "\n" not in str(info.value)


def test_a_prompt_longer_than_the_largest_bucket_is_refused(cli):
    with pytest.raises(InputError, match="exceeds the largest bucket"):
        cli("steer", *cli.common, "--concept", "calm", "--strength", 0.1, "--prompt", "x" * 3000)
