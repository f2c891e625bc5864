"""Numerical parity of emojax with transformers on tiny random checkpoints of every supported family.

Every case is a checkpoint written by transformers' own save_pretrained (see hf_checkpoints.py). float32:
logits and every residual-stream capture (0 = embeddings .. L = after the final norm) must match
transformers' output_hidden_states to 1e-4 absolute. bfloat16: the same checkpoint loaded in bfloat16 must
agree with the transformers float32 logits on the argmax at >= 99% of positions and to 2e-2 relative error.

The bf16 reference is transformers in float32 (not in bfloat16): with plain i.i.d. random weights even
transformers' own bf16 run misses 99% argmax agreement with its fp32 run (near-ties), and emojax bf16 vs
transformers bf16 does no better (the two round at different places), so the checkpoints are built with
decisive logits instead (hf_checkpoints.make_logits_decisive); the thresholds are unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import emojax
from hf_checkpoints import CASES, CheckpointCache, random_tokens, run_torch

FLOAT32_ATOL = 1e-4
BF16_MIN_ARGMAX_AGREEMENT = 0.99
BF16_MAX_REL_ERROR = 2e-2
BF16_BATCH, BF16_SEQ = 4, 32  # 128 positions: one disagreement is 0.8%, two already fail

CASE_NAMES = list(CASES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return CheckpointCache(tmp_path_factory.mktemp("hf_parity"))


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_checkpoint_is_discriminating(checkpoints, name):
    """Guards the tests' own power: biases and norm weights are random, and each case has its feature."""
    ckpt = checkpoints.get(name)
    cfg = ckpt.model.config
    for pname, p in ckpt.model.named_parameters():
        p = p.detach()
        if pname.endswith(".bias"):
            assert float(p.abs().min()) > 0, f"{pname} has zero entries: a bias mapping bug could hide"
        if "norm" in pname:
            assert float((p - 1).abs().min()) > 0 and float((p - 1).abs().max()) > 1e-2, (
                f"{pname} is all ones: a norm-weight mapping bug could hide")
    saved = (ckpt.path / "config.json").read_text()
    assert f'"model_type": "{cfg.model_type}"' in saved
    if name == "llama_rope_llama3":
        # the llama3 scaling must really change the frequencies (not only past the tested lengths)
        scaled = ckpt.model.model.rotary_emb.inv_freq
        dim = cfg.head_dim
        plain = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        changed = ~torch.isclose(scaled.float(), plain, rtol=1e-3)
        assert int(changed.sum()) >= dim // 2 - 1, f"llama3 scaling changed only {int(changed.sum())} frequencies"
    if name == "mistral_window":
        assert cfg.sliding_window == 4 and CASES[name].seq_len > cfg.sliding_window
    if name in ("qwen3", "gemma", "gemma3"):
        assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    if name in ("gemma2_window", "gemma3"):
        assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
        assert CASES[name].seq_len > cfg.sliding_window
        assert cfg.query_pre_attn_scalar != cfg.head_dim
    if name == "gemma2_window":  # the final soft-cap really bends the logits
        logits, _ = run_torch(ckpt.model, random_tokens(2, 13, ckpt.vocab_size, seed=5))
        assert 0.5 * cfg.final_logit_softcapping < np.abs(logits).max() < cfg.final_logit_softcapping
    if name == "gemma3":
        local, full = cfg.rope_parameters["sliding_attention"], cfg.rope_parameters["full_attention"]
        assert local["rope_theta"] != full["rope_theta"] and full["rope_type"] == "linear"
    if name == "gpt2_full_context":
        assert CASES[name].seq_len == cfg.n_positions
    if name.startswith("gpt_neox"):
        assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
        assert cfg.use_parallel_residual == (name == "gpt_neox_parallel")
    if cfg.tie_word_embeddings:
        output, input_ = ckpt.model.get_output_embeddings(), ckpt.model.get_input_embeddings()
        assert output.weight.data_ptr() == input_.weight.data_ptr()
    else:
        assert not torch.equal(ckpt.model.get_output_embeddings().weight, ckpt.model.get_input_embeddings().weight)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_float32_logits_and_every_hidden_state(checkpoints, name):
    ckpt = checkpoints.get(name)
    L = ckpt.n_layers
    tokens = random_tokens(3, CASES[name].seq_len, ckpt.vocab_size, seed=11)
    ref_logits, ref_hidden = run_torch(ckpt.model, tokens)
    assert len(ref_hidden) == L + 1

    lm = emojax.load_model(ckpt.path, dtype="float32")
    out = lm(tokens, capture=tuple(range(L + 1)))

    assert out.logits.shape == ref_logits.shape
    assert out.logits.dtype == np.float32
    assert len(out.hidden) == L + 1
    errors = {f"hidden[{i}]": _max_abs(h, r) for i, (h, r) in enumerate(zip(out.hidden, ref_hidden))}
    errors["logits"] = _max_abs(out.logits, ref_logits)
    for i, (h, r) in enumerate(zip(out.hidden, ref_hidden)):
        assert h.shape == r.shape, f"hidden[{i}] shape {h.shape} != {r.shape}"
    bad = {k: v for k, v in errors.items() if not v <= FLOAT32_ATOL}
    assert not bad, f"{name}: max abs errors above {FLOAT32_ATOL}: {bad} (all: {errors})"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bfloat16_logits_match_float32_reference(checkpoints, name):
    ckpt = checkpoints.get(name)
    seq = min(BF16_SEQ, getattr(ckpt.model.config, "n_positions", BF16_SEQ))  # GPT-2 has 16 positions here
    tokens = random_tokens(BF16_BATCH * BF16_SEQ // seq, seq, ckpt.vocab_size, seed=23)
    ref_logits, _ = run_torch(ckpt.model, tokens)  # transformers in float32

    lm = emojax.load_model(ckpt.path, dtype="bfloat16")
    logits = np.asarray(lm(tokens).logits, np.float32)

    assert logits.shape == ref_logits.shape
    assert np.isfinite(logits).all()
    agreement = float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1)))
    rel = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
    assert agreement >= BF16_MIN_ARGMAX_AGREEMENT, f"{name}: bf16 argmax agreement {agreement:.4f}, rel error {rel:.4g}"
    assert rel <= BF16_MAX_REL_ERROR, f"{name}: bf16 relative logit error {rel:.4g}, agreement {agreement:.4f}"
    # the model really ran in bfloat16 (a float32 run would be ~1e-6 away)
    assert rel > 1e-4, f"{name}: bf16 logits are float32-exact (rel {rel:.2g}); was dtype='bfloat16' ignored?"
