"""The field's standard SAE metrics: reconstruction (L0, FVU, MSE, cosine), dead fraction, the spliced-in LM
loss (CE with the reconstruction substituted vs clean vs zero-ablation, loss recovered, KL to clean) on
held-out documents, and how well concept-bank directions match decoder rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from emojax.models.interventions import Interventions
from emojax.sae.model import Sae


def reconstruction_metrics(x_BD, recon_BD, acts_BF) -> dict:
    """L0 (mean active latents per token), FVU, MSE (per element), mean cosine of x and its reconstruction."""
    x, r = np.asarray(x_BD, np.float64), np.asarray(recon_BD, np.float64)
    err = ((r - x) ** 2).sum()
    cos = (x * r).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return {"l0": float((np.asarray(acts_BF) > 0).sum(1).mean()),
            "fvu": float(err / max(((x - x.mean(0)) ** 2).sum(), 1e-12)),
            "mse": float(err / x.size), "cosine": float(cos.mean())}


def dead_fraction(since_fired_F, window_tokens: int) -> float:
    """Fraction of latents that did not fire in the last window_tokens training tokens."""
    return float(np.mean(np.asarray(since_fired_F) >= window_tokens))


def evaluate_batches(sae: Sae, batches: Iterable[np.ndarray]) -> dict:
    """Reconstruction metrics over all tokens of batches of raw activations [B, D]: L0, MSE and cosine are token
    means; FVU divides the summed squared error by the tokens' variance about their global mean (not each
    batch's own mean, which would leave the between-document variance out of the denominator)."""
    n, err, l0, cos = 0, 0.0, 0.0, 0.0
    total, total_sq = 0.0, 0.0
    for x in batches:
        acts = sae.encode(x)
        x64, r = np.asarray(x, np.float64), np.asarray(sae.decode(acts), np.float64)
        m = reconstruction_metrics(x64, r, acts)
        err += ((r - x64) ** 2).sum()
        l0, cos = l0 + m["l0"] * len(x), cos + m["cosine"] * len(x)
        total, total_sq = total + x64.sum(0), total_sq + (x64 ** 2).sum()
        n += len(x)
    if n == 0:
        return {}
    variance = total_sq - (np.asarray(total) ** 2).sum() / n
    return {"l0": l0 / n, "fvu": float(err / max(variance, 1e-12)), "mse": float(err / (n * np.size(total))),
            "cosine": cos / n}


def _log_probs(logits_BTV):
    return jax.nn.log_softmax(jnp.asarray(logits_BTV, jnp.float32), axis=-1)


def spliced_metrics(lm, sae: Sae, layer: int, tokens_BT, mask_BT=None) -> dict:
    """Next-token CE (nats/token) clean, with the SAE reconstruction spliced in at residual index `layer`, and
    with that stream zeroed; CE loss recovered = (zero - spliced) / (zero - clean); delta loss = spliced -
    clean; KL(clean || spliced) per token. Each row's first real token (the BOS where the tokenizer adds one) is
    neither spliced nor zeroed nor scored, and positions with a padded target are excluded.
    """
    tokens = np.asarray(tokens_BT, np.int32)
    mask = np.ones_like(tokens) if mask_BT is None else np.asarray(mask_BT)
    later_BT = (mask > 0) & (np.cumsum(mask > 0, axis=1) > 1)  # real tokens after each row's first
    clean = lm(tokens, mask, capture=(layer,))
    h_BTD = np.asarray(clean.hidden[0], np.float32)
    B, T, D = h_BTD.shape
    recon = np.asarray(sae.reconstruct(h_BTD.reshape(B * T, D))).reshape(B, T, D)
    recon = np.where(later_BT[..., None], recon, h_BTD)  # padding and the first token keep their own values
    none = Interventions.empty(B, lm.config.n_layers, D)
    spliced = lm(tokens, mask, interventions=none.patch_at(recon, layer))
    zero = lm(tokens, mask, interventions=none.patch_at(np.where(later_BT[..., None], 0.0, h_BTD), layer))
    target, valid = tokens[:, 1:], (mask[:, 1:] * later_BT[:, :-1]).astype(np.float64)
    lp = {name: _log_probs(out.logits)[:, :-1] for name, out in
          (("clean", clean), ("spliced", spliced), ("zero", zero))}

    def ce(name):
        nll = -np.asarray(jnp.take_along_axis(lp[name], target[..., None], axis=-1)[..., 0])
        return float((nll * valid).sum() / valid.sum())

    ce_clean, ce_spliced, ce_zero = ce("clean"), ce("spliced"), ce("zero")
    p_clean = jnp.exp(lp["clean"])
    kl = np.asarray(jnp.sum(p_clean * (lp["clean"] - lp["spliced"]), axis=-1))
    return {"ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero": ce_zero,
            "ce_loss_recovered": (ce_zero - ce_spliced) / max(ce_zero - ce_clean, 1e-12),
            "delta_loss": ce_spliced - ce_clean, "kl": float((kl * valid).sum() / valid.sum())}


def heldout_docs(store, split: str = "test", max_docs: int = 16, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of a uniform random sample, seeded, of up to max_docs documents of the split (never
    simply the first ones: store order follows the corpus, which may group documents by source or topic)."""
    index = store.select(split)
    if len(index) > max_docs:
        index = np.sort(np.random.default_rng(seed).choice(index, max_docs, replace=False))
    return index


def heldout_tokens(store, split: str = "test", max_docs: int = 16, max_len: int = 128,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, T] and mask (left-padded, as the model expects) of heldout_docs(store, split, max_docs,
    seed), each cut to its first max_len tokens."""
    docs = store.docs
    index = heldout_docs(store, split, max_docs, seed)
    seqs = [store.token_ids(int(docs.token_start[i]), int(docs.token_start[i] + min(docs.n_tokens[i], max_len)))
            for i in index]
    T = max(len(s) for s in seqs)
    tokens, mask = np.zeros((len(seqs), T), np.int32), np.zeros((len(seqs), T), np.int32)
    for r, s in enumerate(seqs):
        tokens[r, T - len(s):], mask[r, T - len(s):] = s, 1
    return tokens, mask


def bank_max_cosine(bank, layer: int, sae: Sae) -> dict[str, tuple[float, int]]:
    """For each concept of the bank at `layer`: (max cosine with any decoder row, that latent's index)."""
    v = np.asarray(bank.at_layer(layer), np.float64)  # [C, D]
    W = sae.decoder_rows().astype(np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    cos = v @ W.T  # [C, F]
    best = cos.argmax(1)
    return {name: (float(cos[c, best[c]]), int(best[c])) for c, name in enumerate(bank.names)}
