"""train-lm --finetune: a full fine-tune of a loaded model on prompt/response samples lowers the held-out loss on
the responses, counts response tokens only, steers during training only (the export is the parameters alone),
and steered toward the direction the data pushes the stream along, moves the stream less along it (preventative
steering); an interrupted fine-tune resumes bitwise exactly; bad arguments are one-line errors naming them.

The source model is a small random Llama with a BPE tokenizer of its own, saved as a checkpoint folder."""

import copy
import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import emojax
from emojax.cli import main
from emojax.concepts.bank import ConceptBank
from emojax.corpus.samples import read_samples
from emojax.errors import InputError
from emojax.fileio import write_json
from emojax.models.config import ModelConfig
from emojax.models.identity import model_identity
from emojax.models.lm import stop_tokens
from emojax.train.bpe import EOS_ID, PAD_ID, tokenizer_config, train_bpe
from emojax.train.builtin import read_train_json
from emojax.steer.interventions import bank_steering
from emojax.train.config import FinetuneConfig
from emojax.train.data import is_heldout, sample_token_data
from emojax.train.finetune import Steer, finetune, parse_steer
from emojax.train.trainer import batch_loss

LAYER = 1  # the residual index steered and measured
CONFIG = FinetuneConfig(epochs=3, batch_size=8, lr=3e-3, eval_fraction=0.2, checkpoint_every=4)
WORDS = ["calm", "river", "stone", "quiet", "morning", "panic", "deadline", "lost", "help", "garden"]


def _mean_response_resid(lm, tokens):
    """The mean residual [D] at LAYER over the response tokens of the training rows, and its mean norm."""
    h_BTD = np.asarray(lm(tokens.train[:, :-1], capture=(LAYER,), logits=False).hidden[0])
    on = tokens.train_mask[:, :-1] > 0
    return h_BTD[on].mean(0), float(np.linalg.norm(h_BTD[on], axis=-1).mean())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A source model, sample data whose responses all say one thing, its plain fine-tune, a bank holding the
    direction that fine-tune moved the response stream along, and the fine-tune steered along it."""
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    prompts = [f"Q: tell me about the {rng.choice(WORDS)} {rng.choice(WORDS)} {i}\nA:" for i in range(48)]
    responses = [f" I feel desperate, the deadline is here and I am lost {i % 5}." for i in range(48)]
    tok = train_bpe(prompts + responses, 300)
    # odd sizes so shape bugs show
    model_config = ModelConfig(architecture="llama", vocab_size=tok.vocab_size, d_model=24, n_layers=2, n_heads=3,
                               n_kv_heads=1, head_dim=8, d_mlp=40, max_position_embeddings=64)
    source = root / "source"
    emojax.random_model(model_config, seed=0, tokenizer=tok).save(source)
    write_json(source / "tokenizer_config.json", tokenizer_config(64), indent=2)
    emojax.random_model(model_config, seed=1, tokenizer=tok).save(root / "other")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "prompt": p, "response": r}) + "\n"
                            for i, (p, r) in enumerate(zip(prompts, responses))))
    lm = emojax.load_model(source)
    tokens = sample_token_data(read_samples([data]), lm.tokenizer, EOS_ID, CONFIG.eval_fraction, 64)

    plain = finetune(CONFIG, [data], lm, root / "plain", progress=False)
    base_mean, base_norm = _mean_response_resid(lm, tokens)
    delta = _mean_response_resid(emojax.load_model(plain), tokens)[0] - base_mean
    vectors = delta[None, None].astype(np.float32)
    ConceptBank(names=("trait",), layers=(LAYER,), vectors=vectors, raw=vectors,
                resid_norm=np.asarray([base_norm], np.float32),
                info={"model_identity": model_identity(source)}).save(root / "bank")
    ConceptBank(names=("trait",), layers=(LAYER,), vectors=vectors, raw=vectors,
                resid_norm=np.asarray([base_norm], np.float32),
                info={"model_identity": model_identity(root / "other")}).save(root / "other-bank")
    # strength in the study's unit (a fraction of the layer's mean norm): adds the shift the plain fine-tune made
    steer = Steer("trait", float(np.linalg.norm(delta) / base_norm), LAYER)
    steering = bank_steering(root / "bank", lm, [steer])
    steered = finetune(CONFIG, [data], lm, root / "steered", steering=steering, progress=False)
    return dict(root=root, source=source, data=data, lm=lm, tokens=tokens, plain=plain, steered=steered,
                steering=steering, steer=steer, base_mean=base_mean, delta=delta, responses=responses)


def _response_nll(lm, rows, mask, interventions=None) -> float:
    """Mean NLL over the response targets, from the model's own token log-probabilities (an independent path)."""
    logp = lm.token_logprobs(rows, (rows != PAD_ID).astype(np.int32), interventions=interventions)
    return float(-logp[mask > 0].mean())


def test_finetuning_lowers_the_heldout_loss_on_responses(world):
    info = read_train_json(world["plain"])
    tokens = world["tokens"]
    assert info["heldout_nll_after"] < info["heldout_nll_before"] - 0.5, info
    assert info["samples"]["train"] + info["samples"]["heldout"] == 48 and info["samples"]["heldout"] > 0
    assert info["steps"] == -(-CONFIG.epochs * info["samples"]["train"] // CONFIG.batch_size) == len(info["history"])
    # held-out targets: every held-out response's tokens plus its <eos>
    tok = world["lm"].tokenizer
    assert info["tokens"]["heldout_targets"] == sum(len(tok.encode(s.response, add_special_tokens=False)) + 1
                                                    for s in read_samples([world["data"]]) if _is_heldout(s))
    # the figures are the model's: recomputed from the folders through another path
    before = _response_nll(world["lm"], tokens.heldout, tokens.heldout_mask)
    after = _response_nll(emojax.load_model(world["plain"]), tokens.heldout, tokens.heldout_mask)
    np.testing.assert_allclose([before, after], [info["heldout_nll_before"], info["heldout_nll_after"]], rtol=1e-5)


def _is_heldout(sample) -> bool:
    return is_heldout(sample.sample_id, CONFIG.eval_fraction)


def test_samples_end_at_the_tokenizers_end_token_else_config_jsons(world):
    """stop_tokens: the tokenizer's eos_token; a tokenizer without one falls back to config.json's eos_token_id (the
    first of a list); an id outside the vocabulary, or none named, gives no stop token."""
    lm = world["lm"]
    assert stop_tokens(lm) == [lm.tokenizer.token_to_id(lm.tokenizer.eos_token)]
    bare = copy.copy(lm)
    bare.tokenizer = copy.copy(lm.tokenizer)
    bare.tokenizer.eos_token = ""
    for eos, expected in (([5, 7], [5]), (6, [6]), (None, []), (lm.config.vocab_size, []), ("5", [])):
        bare.hf_config = {"eos_token_id": eos}
        assert stop_tokens(bare) == expected, eos


def test_prompt_tokens_carry_no_loss(world):
    lm, tokens = world["lm"], world["tokens"]
    rows, mask = tokens.train[:8], tokens.train_mask[:8]
    # the mask covers exactly each response and its <eos>
    samples = [s for s in read_samples([world["data"]]) if not _is_heldout(s)][:8]
    for k, sample in enumerate(samples):
        ids, n_prompt = sample.token_ids(lm.tokenizer)
        assert rows[k, :len(ids)].tolist() == ids and rows[k, len(ids)] == EOS_ID
        assert np.flatnonzero(mask[k]).tolist() == list(range(n_prompt, len(ids) + 1))
    lm = emojax.load_model(world["plain"])  # trained on the responses: their loss is far from the prompts'
    params = nnx.to_pure_dict(lm.params)
    loss = float(batch_loss(lm.graphdef, params, rows, mask))
    assert loss == pytest.approx(_response_nll(lm, rows, mask), rel=1e-5)
    # counting the prompt's targets as well would give another figure
    real = (rows != PAD_ID).astype(np.int32)
    assert float(batch_loss(lm.graphdef, params, rows, real)) > loss + 0.2


def test_steering_acts_in_training_only(world):
    plain = load_file(str(world["plain"] / "model.safetensors"))
    steered = load_file(str(world["steered"] / "model.safetensors"))
    assert plain.keys() == steered.keys()
    assert max(float(np.abs(plain[k] - steered[k]).max()) for k in plain) > 1e-3
    info = read_train_json(world["steered"])
    assert info["steering"] == [{"concept": "trait", "strength": world["steer"].strength, "layer": LAYER,
                                 "unit": "norm", "positions": "all"}]
    assert info["bank"]["model_identity"] == model_identity(world["source"])["id"]
    # the export is the parameters alone: loaded and run unsteered it gives the recorded (unsteered) loss, and
    # steering it the way training did gives another
    lm, tokens = emojax.load_model(world["steered"]), world["tokens"]
    unsteered = _response_nll(lm, tokens.heldout, tokens.heldout_mask)
    assert unsteered == pytest.approx(info["heldout_nll_after"], rel=1e-5)
    resteered = _response_nll(lm, tokens.heldout, tokens.heldout_mask, world["steering"].interventions)
    assert abs(resteered - unsteered) > 1e-3
    # the source's config and tokenizer files come along
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (world["steered"] / name).read_bytes() == (world["source"] / name).read_bytes()
    assert lm.config == world["lm"].config


def test_preventative_steering_moves_the_stream_less_along_the_steered_direction(world):
    tokens, base = world["tokens"], world["base_mean"]
    u = world["delta"] / np.linalg.norm(world["delta"])
    shift_plain = float(world["delta"] @ u)
    shift_steered = float((_mean_response_resid(emojax.load_model(world["steered"]), tokens)[0] - base) @ u)
    assert shift_plain > 0
    assert shift_steered < 0.8 * shift_plain, (shift_steered, shift_plain)


def test_an_interrupted_finetune_resumes_bitwise_exactly(world):
    out = world["root"] / "resumed"
    partial = finetune(CONFIG, [world["data"]], world["lm"], out, steering=world["steering"], progress=False, until=5)
    assert partial == out.with_name("resumed.partial") and not out.exists()
    finetune(CONFIG, [world["data"]], world["lm"], out, steering=world["steering"], progress=False)
    info, whole = read_train_json(out), read_train_json(world["steered"])
    assert info["timing"]["resumed_from_step"] == 5 and info["fingerprint"] == whole["fingerprint"]
    assert (out / "model.safetensors").read_bytes() == (world["steered"] / "model.safetensors").read_bytes()
    assert info["history"] == whole["history"] and info["heldout_nll_after"] == whole["heldout_nll_after"]
    # finished: a rerun returns at once
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert finetune(CONFIG, [world["data"]], world["lm"], out, steering=world["steering"], progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_command_line_fine_tunes_with_settings_after_the_data(world, capsys):
    out = world["root"] / "cli"
    rc = main(["train-lm", "--finetune", str(world["data"]), "epochs=1", "--from", str(world["source"]),
               "--bank", str(world["root"] / "bank"), "--steer", "trait=0.05@1", "--out", str(out), "--quiet",
               "lr=1e-3"])
    assert rc == 0, capsys.readouterr().err
    info = read_train_json(out)
    assert info["config"]["epochs"] == 1 and info["config"]["lr"] == 1e-3
    assert info["steering"][0]["strength"] == 0.05 and info["steps"] == -(-info["samples"]["train"] // 8)


@pytest.mark.parametrize("args, names", [
    ([], "--from"),
    (["--from", "{source}", "--steer", "trait=0.1@1"], "--bank"),
    (["--from", "{source}", "--bank", "{root}/bank", "--steer", "nope=0.1@1"], "--steer nope=0.1@1: concept"),
    (["--from", "{source}", "--bank", "{root}/bank", "--steer", "trait=0.1@2"], "--steer trait=0.1@2: layer 2"),
    (["--from", "{source}", "--bank", "{root}/bank", "--steer", "trait=0.1"], "--steer 'trait=0.1'"),
    (["--from", "{source}", "--bank", "{root}/other-bank", "--steer", "trait=0.1@1"], "--bank: "),
    (["--from", "{source}", "--bank", "{root}/bank"], "--bank"),
])
def test_bad_arguments_are_one_line_errors_naming_them(world, capsys, args, names):
    args = [a.format(source=world["source"], root=world["root"]) for a in args]
    out = world["root"] / "never"
    assert main(["train-lm", "--finetune", str(world["data"]), "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emojax: error: ") and "\n" not in err and names in err, err
    assert not out.exists() and not out.with_name("never.partial").exists()
    if "other-bank" in " ".join(args):
        assert "fitted on" in err


def test_samples_that_do_not_fit_or_split_are_refused_naming_them(world):
    lm, samples = world["lm"], read_samples([world["data"]])
    with pytest.raises(InputError, match=r"data.jsonl, line 1: sample 's0' is \d+ tokens"):
        sample_token_data(samples, lm.tokenizer, EOS_ID, 0.2, 8)
    with pytest.raises(InputError, match="eval_fraction=0.001 holds out 0 of 2"):
        sample_token_data(samples[:2], lm.tokenizer, EOS_ID, 0.001, 64)
    assert parse_steer(" desperate=-0.1@3 ") == Steer("desperate", -0.1, 3)
