"""The study's recipe as METHOD.md section 8 settles it: the layer is chosen on the validation split and reported
on test, and a direction's logit lens goes through a LayerNorm's scale but not its bias."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from synthetic_store import write_synthetic_store

import emojax
from emojax.concepts.config import FitConfig
from emojax.concepts.fit import fit
from emojax.models.presets import SHAPES


def test_the_layer_is_chosen_on_validation_and_reported_on_test(tmp_path):
    """Layer 1 separates the concepts on train and val; layer 2 only on test (a store built so that choosing on
    test would pick layer 2). The fit picks layer 1 and reports layer 1's test figures."""
    rng = np.random.default_rng(0)
    C, D, per = 3, 16, 40
    splits = ["train"] * (C * per) + ["val"] * (C * per) + ["test"] * (C * per)
    labels = np.tile(np.repeat(np.arange(C), per), 3)
    means = rng.normal(size=(C, D)) * 3
    noise = rng.normal(size=(len(labels), D))
    split = np.asarray(splits)
    clean = means[labels] + noise
    layer1 = np.where((split == "test")[:, None], noise, clean)  # concepts visible on train and val only
    layer2 = np.where((split == "val")[:, None], noise, clean)  # visible on train and test only
    store = write_synthetic_store(tmp_path / "store", {1: layer1, 2: layer2}, labels, splits,
                                  label_ids={f"c{i}": i for i in range(C)})
    fit(FitConfig(store=store, out=str(tmp_path / "bank"), probe=False, denoise=False, kmeans_k=2))
    report = json.loads((tmp_path / "bank" / "eval.json").read_text())
    per_layer = report["per_layer"]
    assert per_layer["2"]["test"]["nearest"]["top1"] > per_layer["1"]["test"]["nearest"]["top1"] + 0.3
    assert report["best_layer"] == 1 and report["best_by"].startswith("validation")
    assert per_layer["1"]["val"]["nearest"]["top1"] > 0.9


def test_the_logit_lens_of_a_layernorm_model_leaves_out_the_bias():
    cfg = SHAPES["gpt2"].replace(n_layers=1, layer_windows=(0,), vocab_size=300, d_model=32, n_heads=2, n_kv_heads=2,
                                 head_dim=16, d_mlp=64, learned_positions=64)
    lm = emojax.random_model(cfg, seed=0)
    norm = lm.model.final_norm
    assert norm.kind == "layer"
    lm.params["final_norm"]["bias"].value = jnp.asarray(np.random.default_rng(1).normal(size=32) * 5, jnp.float32)
    v = np.random.default_rng(2).normal(size=(2, 32))
    centred = v - v.mean(-1, keepdims=True)
    normed = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + norm.eps) * np.asarray(norm.scale[...])
    head = np.asarray(lm.params["embed"][...]).T
    np.testing.assert_allclose(lm.logit_lens(v), normed @ head, rtol=1e-4, atol=1e-4)
    with_bias = (normed + np.asarray(lm.params["final_norm"]["bias"][...])) @ head
    assert not np.allclose(lm.logit_lens(v), with_bias, atol=1e-2)  # the bias would have changed the ranking


def test_monitor_readings_are_z_scores_against_neutral_tokens(tmp_path):
    """The fit measures each concept's readout over neutral tokens (first token left out); the monitor's readout
    of a calibrated bank is the z-score against it, so neutral text reads ~N(0, 1) and thresholds are z-units."""
    from emojax.concepts.bank import load_bank
    from emojax.concepts.evaluate import concept_readout
    from emojax.steer.monitor import Rule, find_alerts, readout_from_bank

    rng = np.random.default_rng(5)
    C, D, per, T = 3, 12, 30, 6
    labels = np.concatenate([np.repeat(np.arange(C), per), np.full(per, -1)])
    splits = ["train"] * len(labels)
    means = np.concatenate([rng.normal(size=(C, D)) * 2, np.zeros((1, D))])
    tokens = means[labels][:, None, :] + rng.normal(size=(len(labels), T, D))
    store = write_synthetic_store(tmp_path / "store", {1: tokens.mean(1)}, labels, splits, tokens={1: tokens},
                                  label_ids={f"c{i}": i for i in range(C)})
    bank = fit(FitConfig(store=store, out=str(tmp_path / "bank"), probe=False, denoise=False, kmeans_k=2,
                         eval_splits=("train",)))
    bank = load_bank(tmp_path / "bank")
    neutral = tokens[labels == -1][:, 1:].reshape(-1, D).astype(np.float32)  # first tokens left out
    want = concept_readout(neutral, bank.at_layer(1), bank.center[0])
    mean, std = bank.calibration(1)
    np.testing.assert_allclose(mean, want.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, want.std(0, ddof=1), atol=1e-5)
    readout, names = readout_from_bank(bank, 1, metric=None)  # a calibrated bank reads z-scores by default
    z = np.asarray(readout(jnp.asarray(neutral)[None]))[0]
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0, ddof=1), 1, atol=1e-3)
    concept0 = tokens[labels == 0][:3].reshape(-1, D).astype(np.float32)
    z0 = np.asarray(readout(jnp.asarray(concept0)[None]))[0]
    assert z0[:, 0].mean() > 3  # a concept's own text stands out in z-units
    alerts = find_alerts(z0[None], np.arange(len(z0))[None], [Rule.parse("c0>2:3")], names)
    assert alerts and alerts[0].concept == "c0"


def test_pooling_counts_real_tokens_and_leaves_out_bos():
    """The offset counts a document's real text tokens whatever the padding (left here), the BOS never enters the
    mean, and a document no longer than the offset is pooled from its first text token."""
    from emojax.store.step import _reduce_fn

    BOS, pool_start, D = 7, 3, 4
    lengths = [9, 3]  # text tokens after the BOS: one past the offset, one short
    T = 12
    tokens = np.zeros((2, T), np.int32)
    mask = np.zeros((2, T), np.int32)
    hidden = np.zeros((2, T, D), np.float32)
    for b, n in enumerate(lengths):
        cols = np.arange(T - n - 1, T)  # left padding, then BOS, then n text tokens
        tokens[b, cols] = [BOS, *range(10, 10 + n)]
        mask[b, cols] = 1
        hidden[b, cols] = np.arange(len(cols))[:, None] * np.ones(D)  # value = the token's index in the document
        hidden[b, cols[0]] = 1000.0  # the BOS: any leak into a mean shows
    _, pooled, count, _ = _reduce_fn(pool_start, "float32", BOS)((jnp.asarray(hidden),), jnp.asarray(mask),
                                                                 jnp.asarray(tokens))
    # document 0: text tokens 1..9 (index in the document); from the 3rd text token on: indices 4..9
    np.testing.assert_allclose(np.asarray(pooled[0])[0], np.full(D, np.mean(np.arange(4, 10))), atol=1e-5)
    # document 1: 3 text tokens, no longer than the offset: all of them, indices 1..3, never the BOS
    np.testing.assert_allclose(np.asarray(pooled[0])[1], np.full(D, 2.0), atol=1e-5)
    assert np.asarray(count).tolist() == [6, 3]
    # a tokenizer without a BOS: the first token is text and counts
    _, pooled, count, _ = _reduce_fn(pool_start, "float32", None)((jnp.asarray(hidden),), jnp.asarray(mask),
                                                                   jnp.asarray(tokens))
    assert np.asarray(count).tolist() == [7, 1]  # the second document: 4 tokens, from its 3rd on


def test_tokenizers_name_the_bos_they_add():
    from emojax.tokenizer import ByteTokenizer
    from emojax.train.bpe import BOS_ID, train_bpe

    assert ByteTokenizer().bos_id == ByteTokenizer.BOS
    bpe = train_bpe(["a calm day", "a desperate night"] * 4, vocab_size=300)
    assert bpe.bos_id == BOS_ID and bpe.encode("a")[0] == BOS_ID


def test_class_aurocs_equal_the_pairwise_definition_with_ties():
    from emojax.concepts.evaluate import class_aurocs

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(40, 3)).astype(float)  # many ties
    labels = rng.integers(0, 3, 40)
    for c, got in enumerate(class_aurocs(scores, labels)):
        pos, neg = scores[labels == c, c], scores[labels != c, c]
        want = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
        np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.isnan(class_aurocs(scores, np.zeros(40, int))[1])  # no positives for class 1


def test_every_metric_has_a_bootstrap_interval_and_its_chance_level():
    from emojax.concepts.evaluate import readout_metrics

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 10, 300)
    scores = rng.normal(size=(300, 10))
    scores[np.arange(300), labels] += 1.0
    m = readout_metrics(scores, labels)
    assert m["chance"] == {"top1": 0.1, "top5": 0.5, "macro_auroc": 0.5}
    for key in ("top1", "top5", "macro_auroc"):
        lo, hi = m[f"{key}_ci95"]
        assert lo < m[key] < hi and hi - lo < 0.2
    assert m["top1_ci95"][0] > m["chance"]["top1"]  # a real signal: the interval clears chance
    noise = readout_metrics(rng.normal(size=(300, 10)), labels)
    assert noise["macro_auroc_ci95"][0] < 0.5 < noise["macro_auroc_ci95"][1]  # no signal: chance is inside


class _TokenStore:
    """The parts of an ActivationStore the bag-of-tokens baseline reads: documents, labels, splits, token ids."""

    def __init__(self, docs_tokens, labels, splits):
        from types import SimpleNamespace

        from emojax.store.state import SPLIT_CODES

        lengths = np.array([len(t) for t in docs_tokens])
        self._ids = np.concatenate(docs_tokens).astype(np.int32)
        self.docs = SimpleNamespace(token_start=np.concatenate([[0], np.cumsum(lengths)[:-1]]), n_tokens=lengths,
                                    label_id=np.asarray(labels), split=np.array([SPLIT_CODES[s] for s in splits]))
        self.label_ids = {f"c{i}": i for i in range(int(max(labels)) + 1)}

    def select(self, split):
        from emojax.store.state import SPLIT_CODES

        return np.flatnonzero(self.docs.split == SPLIT_CODES[split])

    def token_ids(self, start, stop):
        return self._ids[start:stop]


def test_the_bag_of_words_baseline_reads_words_and_nothing_else():
    from emojax.concepts.baselines import bag_of_tokens

    rng = np.random.default_rng(5)
    n, C = 240, 4
    labels = np.tile(np.arange(C), n // C)
    splits = ["train"] * (n // 2) + ["test"] * (n // 2)
    worded = [np.concatenate([rng.integers(100, 500, 20), [10 + c] * 3]) for c in labels]  # each concept's word
    unworded = [rng.integers(100, 500, 23) for _ in labels]
    names = tuple(f"c{i}" for i in range(C))
    words = bag_of_tokens(_TokenStore(worded, labels, splits), names, "train", ("test",))["test"]
    none = bag_of_tokens(_TokenStore(unworded, labels, splits), names, "train", ("test",))["test"]
    assert words["top1"] > 0.95 and words["n"] == n // 2
    assert none["top1_ci95"][0] < 1 / C < none["top1_ci95"][1] + 0.05


def test_the_bag_of_words_baseline_holds_a_bounded_sample_and_scores_in_chunks():
    """A fit split larger than max_docs is sampled (and says so); scoring in chunks changes no figure."""
    from emojax.concepts.baselines import bag_of_tokens, token_counts

    rng = np.random.default_rng(6)
    n, C = 400, 4
    labels = np.tile(np.arange(C), n // C)
    splits = ["train"] * (n // 2) + ["test"] * (n // 2)
    store = _TokenStore([np.concatenate([rng.integers(100, 500, 20), [10 + c] * 3]) for c in labels], labels, splits)
    names = tuple(f"c{i}" for i in range(C))
    whole = bag_of_tokens(store, names, "train", ("test",), chunk_docs=1000)
    chunked = bag_of_tokens(store, names, "train", ("test",), chunk_docs=7)
    assert chunked["test"] == whole["test"] and whole["fit_docs"] == n // 2 and "sample" not in whole["method"]
    capped = bag_of_tokens(store, names, "train", ("test",), max_docs=40)
    assert capped["fit_docs"] == 40 and "a seeded sample of 40 of train's 200" in capped["method"]
    assert capped["test"]["n"] == n // 2 and capped["test"]["top1"] > 0.9
    counts = token_counts(store, np.array([0, 3]), 64)  # log counts folded mod 64, rows at unit norm
    expected = np.zeros(64)
    np.add.at(expected, store.token_ids(0, 23) % 64, 1.0)
    np.testing.assert_allclose(counts[0], np.log1p(expected) / np.linalg.norm(np.log1p(expected)), rtol=1e-6)


def test_implicit_scenarios_are_also_read_at_the_assistant_colon(tmp_path):
    """An implicit scenario's emotion shows only at its last token (the ':' after "Assistant"): the fit reports
    both readings, and only the one at the colon finds it."""
    rng = np.random.default_rng(6)
    C, D, per, T = 3, 12, 30, 5
    means = rng.normal(size=(C, D)) * 3
    labels = np.concatenate([np.repeat(np.arange(C), per)] * 2)
    splits = ["train"] * (C * per) + ["implicit"] * (C * per)
    tokens = rng.normal(size=(len(labels), T, D))
    tokens[: C * per] += means[labels[: C * per]][:, None, :]  # stories: every token
    tokens[C * per:, -1] += 3 * means[labels[C * per:]]  # scenarios: the last token only
    pooled = tokens[:, 1:].mean(1)
    pooled[C * per:] = rng.normal(size=(C * per, D))  # their pooled means carry nothing
    store = write_synthetic_store(tmp_path / "store", {1: pooled}, labels, splits, tokens={1: tokens},
                                  label_ids={f"c{i}": i for i in range(C)})
    fit(FitConfig(store=store, out=str(tmp_path / "bank"), probe=False, denoise=False, kmeans_k=2,
                  eval_splits=("implicit",)))
    layer = json.loads((tmp_path / "bank" / "eval.json").read_text())["per_layer"]["1"]
    assert layer["implicit_at_assistant"]["nearest"]["top1"] > 0.9
    assert layer["implicit"]["nearest"]["top1"] < 0.6
