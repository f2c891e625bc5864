"""The decode loop: greedy generation equals transformers' generate on every family, cached logits equal a full
recompute, interventions equal the forward pass with the same edit, and nothing recompiles for new values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import emojax
from emojax.errors import InputError
from emojax.models.config import ModelConfig
from emojax.steer import DecodeConfig, Decoder, Interventions, Sampling, choose
from emojax.steer.sampling import greedy
from hf_checkpoints import CASES, CheckpointCache

SMALL = DecodeConfig(prompt_buckets=(8, 16), new_token_buckets=(8, 16))
CONFIG = ModelConfig(architecture="llama", vocab_size=97, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2,
                     head_dim=10, d_mlp=64)
L, D = CONFIG.n_layers, CONFIG.d_model
MAX_NEW = 7


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return CheckpointCache(tmp_path_factory.mktemp("hf_decode"))


@pytest.fixture(scope="module")
def lm():
    return emojax.random_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def dec(lm):
    """One decoder for the module: tests of the same intervention structure share its compiled loop."""
    return Decoder(lm, SMALL)


def _prompts(vocab: int, seed: int = 0, lengths=(6, 3, 5)):
    """Left-padded prompts of different lengths [B, T] and their mask."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, T - n:] = rng.integers(1, vocab, n)
        mask[b, T - n:] = 1
    return tokens, mask


def _step_logits_from_forward(lm, gen, **kwargs):
    """Logits of a full forward over the final sequences, at the columns each generated token was chosen from."""
    full = np.asarray(lm(np.asarray(gen.tokens), np.asarray(gen.valid), **kwargs).logits)
    P = gen.prompt_columns
    return full[:, P - 1:P - 1 + gen.logits.shape[1]]


def _assert_step_logits(gen, want, atol):
    got = np.asarray(gen.logits)
    for b, n in enumerate(np.asarray(gen.n_generated)):
        err = float(np.abs(got[b, :n] - want[b, :n]).max())
        assert err <= atol, f"row {b}: cached logits differ from the full recompute by {err:.3g}"


# One case per family runs by default; the other variants of a family (MHA/MQA, llama3 rope, biases, tied
# heads, sequential NeoX) run with the slow tests (each case costs a decode-loop compile).
FAMILY_CASES = ["llama_gqa", "mistral_window", "qwen2", "qwen3", "gemma", "gemma2_window", "gemma3",
                "gpt2_full_context", "gpt_neox_parallel"]
CASE_PARAMS = [pytest.param(n, marks=() if n in FAMILY_CASES else pytest.mark.slow) for n in CASES]


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_greedy_equals_transformers_and_cached_logits_equal_recompute(checkpoints, name):
    ckpt = checkpoints.get(name)
    tokens, mask = _prompts(ckpt.vocab_size)
    with torch.no_grad():
        ref = ckpt.model.generate(torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
                                  max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                                  eos_token_id=None, pad_token_id=0).numpy()[:, tokens.shape[1]:]
    lm = emojax.load_model(ckpt.path)
    gen = Decoder(lm, SMALL).generate(tokens, mask, max_new_tokens=MAX_NEW, return_logits=True)
    got = np.stack([gen.generated(b) for b in range(len(tokens))])
    np.testing.assert_array_equal(got, ref, err_msg=f"{name}: greedy tokens differ from transformers' generate")
    # the full recompute here is transformers' own forward over the final (left-padded) sequences
    seq, valid = np.asarray(gen.tokens), np.asarray(gen.valid)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        full = ckpt.model(input_ids=torch.tensor(seq).long(), attention_mask=torch.tensor(valid).long(),
                          position_ids=torch.tensor(positions).long(), use_cache=False).logits.numpy()
    P = gen.prompt_columns
    _assert_step_logits(gen, full[:, P - 1:P - 1 + gen.logits.shape[1]], atol=1e-4)


def test_unrolled_layers_equal_scanned_layers(lm, dec):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=1)
    unrolled = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, return_logits=True)
    scanned = Decoder(lm, DecodeConfig(prompt_buckets=(8,), new_token_buckets=(8,), unroll_layers=False)).generate(
        tokens, mask, max_new_tokens=MAX_NEW, return_logits=True)
    np.testing.assert_array_equal(np.asarray(unrolled.tokens), np.asarray(scanned.tokens))
    _assert_step_logits(unrolled, _step_logits_from_forward(lm, unrolled), atol=1e-4)
    _assert_step_logits(unrolled, np.asarray(scanned.logits), atol=1e-5)


def test_attention_over_cache_spans_equals_the_full_recompute(lm):
    """The decode loop attends over the shortest of CACHE_SPANS spans of its cache that holds the written columns:
    a generation that crosses every span's end (40 columns: spans end at 16, 24, 32, 40) keeps the full forward's
    logits and the scanned decoder's (which reads the whole cache)."""
    tokens, mask = _prompts(CONFIG.vocab_size, seed=5)
    gen = Decoder(lm, DecodeConfig(prompt_buckets=(8,), new_token_buckets=(32,))).generate(
        tokens, mask, max_new_tokens=32, return_logits=True)
    assert int(np.asarray(gen.n_generated).min()) == 32
    _assert_step_logits(gen, _step_logits_from_forward(lm, gen), atol=1e-4)
    scanned = Decoder(lm, DecodeConfig(prompt_buckets=(8,), new_token_buckets=(32,), unroll_layers=False)).generate(
        tokens, mask, max_new_tokens=32, return_logits=True)
    _assert_step_logits(gen, np.asarray(scanned.logits), atol=1e-5)


def test_a_padded_prompt_generates_what_it_generates_unpadded(dec):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=2)
    batch = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, return_logits=True)
    for b in range(len(tokens)):
        row = tokens[b, mask[b] == 1]
        alone = dec.generate(np.stack([row] * 3), max_new_tokens=MAX_NEW, return_logits=True)  # no padding
        assert alone.generated(0) == batch.generated(b)


def _generated_columns(gen):
    """[B, S] 1.0 on the generated columns: the forward's `generated` mask for the same interventions."""
    generated = np.zeros(np.asarray(gen.tokens).shape, np.float32)
    generated[:, gen.prompt_columns:] = 1
    return generated


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_steering_equals_the_forward_with_the_same_interventions(lm, dec, positions):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=3)
    rng = np.random.default_rng(4)
    v = rng.normal(size=D).astype(np.float32)
    strengths = np.array([0.0, 0.6, -1.3], np.float32)
    iv = Interventions.empty(3, L, D).add(v, layers=(2,), strengths=strengths, positions=positions)
    gen = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, interventions=iv, return_logits=True)
    want = _step_logits_from_forward(lm, gen, interventions=iv, generated=_generated_columns(gen))
    _assert_step_logits(gen, want, atol=1e-5)
    plain = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, return_logits=True)
    assert gen.generated(0) == plain.generated(0)  # strength 0 is no steering
    assert not np.allclose(np.asarray(gen.logits)[2], np.asarray(plain.logits)[2], atol=1e-3)


def test_several_vectors_at_several_layers(lm, dec):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=5)
    rng = np.random.default_rng(6)
    v1, v2 = rng.normal(size=(2, D)).astype(np.float32)
    s = np.array([0.5, -0.5, 1.5], np.float32)
    iv = (Interventions.empty(3, L, D).add(v1, layers=(1, L), strengths=s)
          .add(v2, layers=(0, 2), strengths=s))
    gen = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, interventions=iv, return_logits=True)
    # the same edit written out by hand: one vector per index
    rows = [(1, v1), (L, v1), (0, v2), (2, v2)]
    by_hand = Interventions.empty(3, L, D)
    for index, v in rows:
        by_hand = by_hand.add(v, layers=(index,), strengths=s)
    _assert_step_logits(gen, _step_logits_from_forward(lm, gen, interventions=by_hand), atol=1e-5)


@pytest.mark.parametrize("mean", [0.0, 0.7], ids=["project-out", "to-mean"])
def test_directional_ablation_equals_a_patched_forward(lm, dec, mean):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=7)
    u = np.random.default_rng(8).normal(size=D).astype(np.float32)
    iv = Interventions.empty(3, L, D).ablate(u, layers=(2,), mean=mean)
    gen = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, interventions=iv, return_logits=True)
    seq, valid = np.asarray(gen.tokens), np.asarray(gen.valid)
    h = np.asarray(lm(seq, valid, capture=(2,)).hidden[0])
    unit = u / np.linalg.norm(u)
    patched = h - ((h @ unit) - mean)[..., None] * unit
    patch = Interventions.empty(3, L, D).patch_at(patched, 2)
    _assert_step_logits(gen, _step_logits_from_forward(lm, gen, interventions=patch), atol=1e-4)
    _assert_step_logits(gen, _step_logits_from_forward(lm, gen, interventions=iv), atol=1e-5)


def _sae(variant: str):
    """A random SAE of each variant, with an input scale and thresholds that bind."""
    from emojax.sae.model import Sae
    from emojax.sae.variants import BatchTopK, JumpRelu, ReluL1, TopK

    rng = np.random.default_rng(10)
    F = 23
    params = {"W_enc": rng.normal(size=(D, F)).astype(np.float32) * 0.3,
              "b_enc": rng.normal(size=F).astype(np.float32) * 0.1,
              "W_dec": rng.normal(size=(F, D)).astype(np.float32) * 0.3,
              "b_dec": rng.normal(size=D).astype(np.float32) * 0.1}
    stats = {}
    if variant == "jumprelu":
        params["log_threshold"] = np.log(rng.uniform(0.05, 0.6, F)).astype(np.float32)
    if variant == "batchtopk":
        stats = {"threshold": np.float32(0.3), "threshold_steps": np.int32(10)}
    kind = {"topk": TopK(k_max=4), "batchtopk": BatchTopK(k_max=4), "jumprelu": JumpRelu(), "relu": ReluL1()}
    return Sae(variant=kind[variant], params=params, stats=stats, input_scale=1.7, k=4)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "jumprelu", "relu"])
def test_sae_clamp_keeps_the_error_term(lm, dec, variant):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=9)
    sae = _sae(variant)
    latents = [3, 17]
    values = np.array([[5.0, 0.0], [2.0, 1.0], [0.0, 0.0]], np.float32)
    iv = Interventions.empty(3, L, D).clamp_sae(sae, index=2, latents=latents, values=values)
    gen = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, interventions=iv, return_logits=True)
    seq, valid = np.asarray(gen.tokens), np.asarray(gen.valid)
    h = np.asarray(lm(seq, valid, capture=(2,)).hidden[0])
    B, S, _ = h.shape
    f = np.asarray(sae.encode(h.reshape(B * S, D))).reshape(B, S, -1)  # the SAE's own encoder, thresholds and all
    assert 0 < (f > 0).mean() < 1
    clamped = f.copy()
    clamped[..., latents] = values[:, None, :]
    recon = lambda a: np.asarray(sae.decode(a.reshape(B * S, -1))).reshape(B, S, D)  # noqa: E731
    patched = recon(clamped) + (h - recon(f))  # the clamped reconstruction plus the untouched error term
    patch = Interventions.empty(3, L, D).patch_at(patched, 2)
    _assert_step_logits(gen, _step_logits_from_forward(lm, gen, interventions=patch), atol=2e-4)
    _assert_step_logits(gen, _step_logits_from_forward(lm, gen, interventions=iv), atol=1e-5)


def test_a_patch_of_the_prompt_equals_the_patched_forward(lm, dec):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=13)
    values = np.random.default_rng(14).normal(size=(*tokens.shape, D)).astype(np.float32)
    iv = Interventions.empty(3, L, D).patch_at(values, 1)
    gen = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, interventions=iv, return_logits=True)
    # the same values at the decode loop's (left-padded) prompt columns; generated columns keep their own stream
    seq = np.asarray(gen.tokens)
    P, T = gen.prompt_columns, tokens.shape[1]
    full = np.zeros((*seq.shape, D), np.float32)
    full[:, P - T:P] = values
    weights = np.zeros(seq.shape, np.float32)
    weights[:, P - T:P] = mask
    want = _step_logits_from_forward(lm, gen, interventions=Interventions.empty(3, L, D).patch_at(full, 1, weights))
    _assert_step_logits(gen, want, atol=1e-4)
    plain = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, return_logits=True)
    assert not np.allclose(np.asarray(gen.logits), np.asarray(plain.logits), atol=1e-3)


def test_stop_tokens_end_a_row_and_leave_the_others(dec):
    tokens, mask = _prompts(CONFIG.vocab_size, seed=11)
    free = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, return_logits=True)
    stop = free.generated(0)[2]
    stopped = dec.generate(tokens, mask, max_new_tokens=MAX_NEW, stop_tokens=[stop], return_logits=True)
    for b in range(3):
        seq = free.generated(b)
        n = seq.index(stop) + 1 if stop in seq else MAX_NEW
        assert stopped.generated(b) == seq[:n]
        assert int(np.asarray(stopped.valid)[b].sum()) == int(mask[b].sum()) + n
    short = dec.generate(tokens, mask, max_new_tokens=3, return_logits=True)
    assert [short.generated(b) for b in range(3)] == [free.generated(b)[:3] for b in range(3)]


def test_nothing_recompiles_for_new_values_in_the_same_bucket(lm):
    """A 5-point sweep; then new prompts, vectors, temperatures, top-k/top-p, max_new_tokens and stop tokens."""
    dec = Decoder(lm, SMALL)
    rng = np.random.default_rng(12)
    sweep = np.linspace(-0.1, 0.1, 5).astype(np.float32) * 40

    def run(seed, lengths, max_new, stops, **sampling):
        tokens, mask = _prompts(CONFIG.vocab_size, seed=seed, lengths=lengths)
        iv = Interventions.empty(5, L, D).add(rng.normal(size=D), layers=(2,), strengths=sweep, positions="generated")
        return dec.generate(tokens, mask, max_new_tokens=max_new, interventions=iv, stop_tokens=stops,
                            sampling=Sampling.make(5, **sampling), key=jax.random.key(seed), return_logits=True)

    first = run(0, (6, 3, 5, 8, 1), 7, [], temperature=0.0)
    assert len({tuple(first.generated(b)) for b in range(5)}) > 1  # the sweep changes the generations
    sampled = run(1, (2, 2, 7, 4, 5), 5, [3, 4], temperature=[0.0, 1.0, 0.7, 1.3, 1.0], top_k=[0, 0, 5, 0, 3],
                  top_p=[1.0, 0.9, 1.0, 1.0, 0.5])
    run(2, (8, 8, 8, 8, 8), 8, [9], temperature=0.3)
    assert dec.trace_count == 1
    tokens, mask = _prompts(CONFIG.vocab_size, lengths=(12, 3, 5, 8, 1))  # the next prompt bucket
    dec.generate(tokens, mask, max_new_tokens=7)
    assert dec.trace_count == 2
    # sampled generations: reproducible from the key, greedy where the temperature is 0, and their cached
    # logits are still those of a full recompute
    rng = np.random.default_rng(12)
    run(0, (6, 3, 5, 8, 1), 7, [], temperature=0.0)
    again = run(1, (2, 2, 7, 4, 5), 5, [3, 4], temperature=[0.0, 1.0, 0.7, 1.3, 1.0], top_k=[0, 0, 5, 0, 3],
                top_p=[1.0, 0.9, 1.0, 1.0, 0.5])
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(sampled.tokens))
    n0 = int(np.asarray(sampled.n_generated)[0])
    assert sampled.generated(0) == list(np.asarray(sampled.logits)[0, :n0].argmax(-1))
    rng = np.random.default_rng(12)
    rng.normal(size=D)
    iv = Interventions.empty(5, L, D).add(rng.normal(size=D), layers=(2,), strengths=sweep, positions="generated")
    want = _step_logits_from_forward(lm, sampled, interventions=iv, generated=_generated_columns(sampled))
    _assert_step_logits(sampled, want, atol=1e-4)


def test_bad_inputs_are_user_errors(dec):
    tokens, mask = _prompts(CONFIG.vocab_size, lengths=(17, 2))
    with pytest.raises(InputError, match="exceeds the largest bucket"):
        dec.generate(tokens, mask, max_new_tokens=4)
    tokens, mask = _prompts(CONFIG.vocab_size)
    with pytest.raises(InputError, match="max_new_tokens of 40 exceeds"):
        dec.generate(tokens, mask, max_new_tokens=40)
    with pytest.raises(InputError, match="built for batch 2"):
        dec.generate(tokens, mask, max_new_tokens=4, interventions=Interventions.empty(2, L, D))
    with pytest.raises(InputError, match="token ids"):
        dec.generate(tokens + CONFIG.vocab_size, mask, max_new_tokens=4)
    with pytest.raises(InputError, match="residual index 9"):
        Interventions.empty(3, L, D).add(np.ones(D), layers=(9,))
    with pytest.raises(InputError, match="top_p"):
        Sampling.make(3, top_p=0.0)


def test_sampling_filters_follow_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 3, jnp.float32))
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    sampling = Sampling.make(3, temperature=1.0, top_k=[0, 2, 0], top_p=[1.0, 1.0, 0.7])
    draws = np.asarray(jax.vmap(lambda k: choose(logits, k, sampling))(keys))
    freq = np.stack([np.bincount(draws[:, b], minlength=4) / n for b in range(3)])
    np.testing.assert_allclose(freq[0], [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(freq[1], [0.625, 0.375, 0, 0], atol=0.03)  # top-2, renormalised
    np.testing.assert_allclose(freq[2], [0.625, 0.375, 0, 0], atol=0.03)  # 0.5 + 0.3 reaches 0.7
    # no row truncates: the sort is skipped, and an untruncated row draws exactly as it does beside truncated ones
    plain = np.asarray(jax.vmap(lambda k: choose(logits, k, Sampling.make(3, temperature=1.0)))(keys))
    np.testing.assert_array_equal(plain[:, 0], draws[:, 0])
    np.testing.assert_allclose(np.bincount(plain[:, 1], minlength=4) / n, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    greedy = np.asarray(choose(logits, keys[0], Sampling.make(3)))
    assert (greedy == 0).all()


@pytest.mark.parametrize("V", [5, 256, 1000, 32000])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_is_argmax(V, dtype):
    """The blocked greedy choice equals jnp.argmax: ties go to the first, the last block may be short."""
    x = np.random.default_rng(V).standard_normal((6, V)).astype(np.float32)
    x[1] = 3.0  # all tied: token 0
    x[2] = -np.inf
    x[3, [V // 3, V - 1]] = 100.0  # a tie across blocks
    x[4, V - 1] = 50.0  # the best in the padded last block
    x = jnp.asarray(x, dtype)
    np.testing.assert_array_equal(np.asarray(greedy(x)), np.asarray(jnp.argmax(x, axis=-1)))
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy)(x)), np.asarray(jnp.argmax(x, axis=-1)))


def test_a_sampled_row_depends_on_its_seed_not_on_its_batch(lm):
    dec = Decoder(lm, SMALL)
    tokens, mask = _prompts(CONFIG.vocab_size, seed=3, lengths=(6, 3, 5))
    both = dec.generate(tokens, mask, max_new_tokens=6, sampling=Sampling.make(3, temperature=1.0, seed=[7, 8, 9]),
                        key=jax.random.key(1))
    alone = dec.generate(tokens[1:2], mask[1:2], max_new_tokens=6,
                         sampling=Sampling.make(1, temperature=1.0, seed=[8]), key=jax.random.key(1))
    assert alone.generated(0) == both.generated(1)
    other = dec.generate(tokens[1:2], mask[1:2], max_new_tokens=6,
                         sampling=Sampling.make(1, temperature=1.0, seed=[9]), key=jax.random.key(1))
    assert other.generated(0) != both.generated(1)
