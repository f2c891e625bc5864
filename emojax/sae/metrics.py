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


def dead_fraction(since_fired_F, dead_after_tokens: int) -> float:
    """Fraction of latents that did not fire in the last dead_after_tokens training tokens."""
    return float(np.mean(np.asarray(since_fired_F) >= dead_after_tokens))


def evaluate_batches(sae: Sae, batches: Iterable[np.ndarray]) -> dict:
    """Reconstruction metrics pooled over batches of raw activations [B, D] (token-weighted means)."""
    totals, n = {}, 0
    for x in batches:
        acts = sae.encode(x)
        m = reconstruction_metrics(x, sae.decode(acts), acts)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * len(x)
        n += len(x)
    return {k: v / max(n, 1) for k, v in totals.items()}


def _log_probs(logits_BTV):
    return jax.nn.log_softmax(jnp.asarray(logits_BTV, jnp.float32), axis=-1)


def spliced_metrics(lm, sae: Sae, layer: int, tokens_BT, mask_BT=None) -> dict:
    """Next-token CE (nats/token) clean, with the SAE reconstruction spliced in at residual index `layer`, and
    with that stream zeroed; CE loss recovered = (zero - spliced) / (zero - clean); delta loss = spliced -
    clean; KL(clean || spliced) per token. Positions with a padded target are excluded.
    """
    tokens = np.asarray(tokens_BT, np.int32)
    mask = np.ones_like(tokens) if mask_BT is None else np.asarray(mask_BT)
    clean = lm(tokens, mask, capture=(layer,))
    h_BTD = np.asarray(clean.hidden[0], np.float32)
    B, T, D = h_BTD.shape
    recon = np.asarray(sae.reconstruct(h_BTD.reshape(B * T, D))).reshape(B, T, D)
    recon = np.where(mask[..., None] > 0, recon, h_BTD)  # padding keeps its own values
    none = Interventions.empty(B, lm.config.n_layers, D)
    spliced = lm(tokens, mask, interventions=none.patch_at(recon, layer))
    zero = lm(tokens, mask, interventions=none.patch_at(np.zeros_like(recon), layer))
    target, valid = tokens[:, 1:], (mask[:, 1:] * mask[:, :-1]).astype(np.float64)
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


def heldout_tokens(store, split: str = "test", max_docs: int = 16, max_len: int = 128) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """Token ids [B, T] and mask (left-padded, as the model expects) of up to max_docs held-out documents."""
    docs = store.docs
    index = store.select(split)[:max_docs]
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
