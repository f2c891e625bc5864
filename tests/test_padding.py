"""Left padding through attention_mask leaves the real tokens' logits and hidden states unchanged.

Rows of one batch carry different numbers of left pads (filled with random token ids, so a leak through the
mask would show); every row's real positions must equal the unpadded sequence.

The unpadded reference is one batch of the same shape in which each row starts at position 0 and is followed
by junk on the right, run without a mask: in a causal model positions 0..n-1 do not see the tokens after
them, so they are exactly the unpadded sequence of length n (causality itself is checked by the float32
parity tests, and every row is also compared with transformers run on the bare sequence). Keeping one shape
keeps this file to one compilation per checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest

import emojax
from hf_checkpoints import CheckpointCache, run_torch

PAD_ATOL = 1e-5  # padded vs unpadded emojax, float32
REF_ATOL = 1e-4  # padded emojax vs unpadded transformers, float32
LENGTHS = (13, 9, 4, 11)  # real tokens per row; the batch is padded on the left to the longest


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return CheckpointCache(tmp_path_factory.mktemp("hf_padding"))


def _batches(vocab_size: int, seed: int):
    """(rows, left-padded tokens, mask, unpadded tokens with right junk)."""
    rng = np.random.default_rng(seed)
    T = max(LENGTHS)
    rows = [rng.integers(0, vocab_size, size=n).astype(np.int32) for n in LENGTHS]
    tokens = rng.integers(0, vocab_size, size=(len(rows), T)).astype(np.int32)  # junk in the pad slots
    unpadded = rng.integers(0, vocab_size, size=(len(rows), T)).astype(np.int32)  # junk after the sequence
    mask = np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        tokens[b, T - len(row):] = row
        mask[b, T - len(row):] = 1
        unpadded[b, :len(row)] = row
    return rows, tokens, mask, unpadded


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_left_padding_matches_unpadded(checkpoints, name):
    ckpt = checkpoints.get(name)
    L = ckpt.n_layers
    capture = tuple(range(L + 1))
    rows, tokens, mask, unpadded = _batches(ckpt.vocab_size, seed=5)
    assert len(set(int(n) for n in (mask == 0).sum(1))) == len(rows), "rows must differ in pad count"
    if name == "mistral_window":
        assert max(LENGTHS) > ckpt.model.config.sliding_window

    lm = emojax.load_model(ckpt.path, dtype="float32")
    padded = lm(tokens, attention_mask=mask, capture=capture)
    alone = lm(unpadded, capture=capture)
    leaky = lm(tokens, capture=capture)  # the padded batch without its mask: the junk pads must matter
    T = tokens.shape[1]
    for b, row in enumerate(rows):
        n = len(row)
        ref_logits, ref_hidden = run_torch(ckpt.model, row[None, :])
        got = {"logits": np.asarray(padded.logits)[b, T - n:]}
        want = {"logits": np.asarray(alone.logits)[b, :n]}
        for i in capture:
            got[f"hidden[{i}]"] = np.asarray(padded.hidden[i])[b, T - n:]
            want[f"hidden[{i}]"] = np.asarray(alone.hidden[i])[b, :n]
        errors = {k: float(np.max(np.abs(got[k] - want[k]))) for k in got}
        bad = {k: v for k, v in errors.items() if not v <= PAD_ATOL}
        assert not bad, f"{name} row {b} ({T - n} left pads): padded != unpadded: {bad} (all: {errors})"

        ref = {"logits": ref_logits[0], **{f"hidden[{i}]": ref_hidden[i][0] for i in capture}}
        ref_errors = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in got}
        bad = {k: v for k, v in ref_errors.items() if not v <= REF_ATOL}
        assert not bad, f"{name} row {b} ({T - n} left pads): padded emojax != transformers unpadded: {bad}"
        assert np.isfinite(np.asarray(padded.logits)[b]).all(), f"row {b}: non-finite logits at pad positions"
        if n < T:  # guards the test itself: without the mask, the pads do change the real tokens' outputs
            leak = float(np.max(np.abs(np.asarray(leaky.logits)[b, T - n:] - want["logits"])))
            assert leak > 1e-2, f"{name} row {b}: unmasked pads changed the logits by only {leak:.2g}"
