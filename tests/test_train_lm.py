"""train-lm: the tiny preset learns (held-out perplexity far below a unigram model), writes a folder that
emojax and transformers both load with the same logits, resumes bitwise exactly after an interruption, and
the built-in model cache is reused, and another configuration trains into a folder of its own."""

import argparse
import json

import numpy as np
import pytest
import torch

import emojax
from emojax.config_loader import load_section
from emojax.errors import ConfigError, EmojaxError
from emojax.train import (BOS_ID, EOS_ID, PAD_ID, TrainConfig, ensure_builtin_model, preset_config,
                          read_train_json, train_lm)
from emojax.train import builtin
from emojax.train.commands import register
from emojax.train.builtin import builtin_folder, is_complete
from emojax.train.trainer import DivergedError

TEXTS = [
    "Early in the morning on a Tuesday, she waited by the harbour wall, just as the ferry pulled in.",
    'Human: How do I repot a fern?\n\nAssistant: Gently loosen the roots first. "Café" costs €3 — ok? 😀',
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(cache):
    """The tiny built-in model, trained once for the module (uninterrupted)."""
    return ensure_builtin_model(cache, name="tiny", progress=False)


def test_tiny_model_beats_unigram_baseline(tiny):
    info = read_train_json(tiny)
    assert info["fingerprint"] == preset_config("tiny").fingerprint()
    assert info["tokens"]["heldout_targets"] > 5_000  # a real held-out set, not a handful of tokens
    assert np.isfinite(info["heldout_perplexity"]) and np.isfinite(info["unigram_perplexity"])
    # well below, not just below: the unigram model of this text sits near 190, the tiny model near 45
    assert info["heldout_perplexity"] < 0.5 * info["unigram_perplexity"], info
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == info["config"]["steps"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0


def test_folder_loads_with_emojax_and_tokenizer_round_trips(tiny):
    lm = emojax.load_model(tiny)
    assert lm.config == preset_config("tiny").model_config()
    tok = lm.tokenizer
    assert (tok.token_to_id("<pad>"), tok.token_to_id("<bos>"), tok.token_to_id("<eos>")) == (PAD_ID, BOS_ID, EOS_ID)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert max(max(tok.encode(t)) for t in TEXTS) < lm.config.vocab_size


def test_transformers_loads_the_folder_with_the_same_logits(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = emojax.load_model(tiny)
    hf_tok = AutoTokenizer.from_pretrained(tiny)
    for text in TEXTS:
        assert hf_tok(text).input_ids == lm.tokenizer.encode(text)
    tokens, mask = lm.tokenizer.batch(TEXTS, pad_id=PAD_ID)
    ours = np.asarray(lm(tokens, mask).logits)
    torch.set_float32_matmul_precision("highest")
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    assert np.abs(ours[real]).max() > 1.0  # trained logits, not a near-zero comparison


def test_interrupted_run_resumes_bitwise_exactly(tiny, tmp_path):
    config = preset_config("tiny")
    out = tmp_path / "lm"
    half = config.steps // 2
    assert half % config.checkpoint_every == 0  # interrupted right after a checkpoint
    partial = train_lm(config, out, progress=False, until=half)
    assert not out.exists()  # an unfinished run never sits under the real name
    assert partial == out.with_name("lm.partial") and (partial / "checkpoints").is_dir()
    train_lm(config, out, progress=False)  # a new process would do exactly this
    info = read_train_json(out)
    assert info["timing"]["resumed_from_step"] == half
    assert not (out / "checkpoints").exists() and not partial.exists()
    # bitwise the same parameters as the uninterrupted run of the fixture, and the same loss history
    assert (out / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    assert info["history"] == read_train_json(tiny)["history"]
    assert info["heldout_nll"] == read_train_json(tiny)["heldout_nll"]


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_builtin_model_is_reused_and_another_config_gets_a_folder_of_its_own(tiny, cache, monkeypatch):
    weights = tiny / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    before = _contents(tiny)
    assert ensure_builtin_model(cache, name="tiny", progress=False) == tiny
    assert weights.stat().st_mtime_ns == stamp  # reused, not retrained

    changed = preset_config("tiny", steps=4, warmup_steps=1, n_stories=60)
    folder = ensure_builtin_model(cache, config=changed, name="tiny", progress=False)
    assert folder == builtin_folder(cache, "tiny", changed) != tiny
    info = read_train_json(folder)
    assert info["fingerprint"] == changed.fingerprint() and len(info["history"]) == 4
    # the model other runs were built on is untouched, byte for byte
    assert _contents(tiny) == before and is_complete(tiny, preset_config("tiny").fingerprint())
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted([tiny.name, folder.name])
    # train-lm into a folder holding another configuration's model refuses instead of replacing it
    with pytest.raises(EmojaxError, match="another configuration.*not replaced"):
        train_lm(changed, tiny, progress=False)
    assert _contents(tiny) == before
    # the preset name still loads the preset's default configuration
    monkeypatch.setattr(builtin, "default_cache_dir", lambda: cache)
    assert emojax.load_model("builtin:tiny").source == str(tiny)


def test_unknown_config_key_names_the_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  preset: tiny\n  d_modle: 32\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.d_modle"):
        load_section(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"train\.steps must be a number"):
        load_section(TrainConfig, None, ["steps=many"])
    path.write_text("train:\n  preset: huge\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*train\.preset='huge'.*tiny"):
        load_section(TrainConfig, path)
    # the subcommand raises the same error (the CLI prints it as one line)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train-lm", "--config", str(path.with_name("bad.yaml")), "--out",
                              str(tmp_path / "x")])
    path.with_name("bad.yaml").write_text("train:\n  lr_warmup: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.lr_warmup"):
        args.func(args)


def test_presets_resolve_and_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"train": {"preset": "tiny", "steps": 70}}))
    config = load_section(TrainConfig, path, ["lr=0.5"])
    assert (config.d_model, config.steps, config.lr) == (64, 70, 0.5)
    assert load_section(TrainConfig) == preset_config("default")
    assert config.fingerprint() != preset_config("tiny").fingerprint()
    assert preset_config("tiny", out="elsewhere").fingerprint() == preset_config("tiny").fingerprint()


def test_a_diverging_run_stops_with_an_error_and_exports_nothing(tmp_path):
    config = preset_config("tiny", steps=4, warmup_steps=1, n_stories=60, lr=1e30)
    with pytest.raises(DivergedError, match=r"loss is (nan|inf) at step \d .*lower train\.lr"):
        train_lm(config, tmp_path / "lm", progress=False)
    assert not (tmp_path / "lm").exists()


def test_world_data_trains_on_train_situations_and_reports_the_worlds_entropy(tmp_path):
    """data=world: the training text is the world's (train situations, train-topic neutral dialogues), the held-out
    documents are new ones on its val situations, and train.json sets the held-out loss against a unigram model and
    the world's own entropy over the same documents."""
    from emojax.train.data import train_and_heldout

    config = preset_config("tiny", data="world", n_documents=300, eval_fraction=0.1, seq_len=256, steps=30,
                           warmup_steps=5, checkpoint_every=30)
    train, heldout = train_and_heldout(config)
    assert {d.split for d in train} == {"train"} and {d.split for d in heldout} == {"val"} and len(heldout) == 30
    assert {d.source for d in train} == {"world/story", "world/dialogue", "world/choice", "world/neutral"}
    assert not {d.topic for d in heldout} & {d.topic for d in train}
    info = read_train_json(train_lm(config, tmp_path / "lm", progress=False))
    entropy = info["world_entropy"]
    assert info["documents"] == {"train": len(train), "heldout": 30} and entropy["documents"] == 30
    # each held-out document has rows of its own: its targets are its text tokens and <eos>, the tokens the
    # entropy counts, less one per continuation row of a document longer than a row
    assert 0.9 * entropy["tokens"] <= info["tokens"]["heldout_targets"] <= entropy["tokens"]
    assert 0 < entropy["nats_per_token"] < info["heldout_nll"] < info["unigram_nll"]


def test_the_tokenizer_keeps_the_given_words_whole():
    from emojax.train.bpe import train_bpe

    texts = TEXTS * 20
    plain = train_bpe(texts, 400)
    kept = train_bpe(texts, 400, words=("grief-stricken", "desperate", "calm"))
    assert len(plain.backend.encode(" desperate", add_special_tokens=False).ids) > 1
    for word in ("desperate", "calm"):
        assert len(kept.backend.encode(f" {word}", add_special_tokens=False).ids) == 1, word
        assert kept.decode(kept.encode(f"She felt {word}.")) == f"She felt {word}."
