"""What a trivial reader gets on the same splits: the yardstick the fit's accuracies are read against.

`bag_of_tokens`: a multinomial logistic regression on each document's token counts (the store's token ids, so
the model's own tokenizer defines the words), trained on the fit split and scored with the same metrics and
bootstrap intervals as the concept vectors. A concept vector that does no better than this has learned the
words of its stories, not a representation of the emotion.

Memory is bounded whatever the store's size: the regression is fitted on at most `max_docs` documents of the fit
split (a seeded uniform sample when it holds more; the sample's size is recorded with the figures), and every
split is scored `chunk_docs` documents at a time. The counts held at once are at most
max(max_docs, chunk_docs) x n_features float32 (128 MiB at the defaults), twice while they move to the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emojax.concepts.evaluate import readout_metrics
from emojax.store.reader import ActivationStore
from emojax.store.state import SPLIT_CODES

N_FEATURES = 4096  # token ids are folded modulo this many features
MAX_DOCS = 8192  # the most fit-split documents the regression is fitted on


def token_counts(store: ActivationStore, docs: np.ndarray, n_features: int, block: int = 256) -> np.ndarray:
    """[len(docs), n_features] float32: log(1 + count) of each token id (folded modulo n_features), rows
    scaled to unit norm; counted `block` documents at a time, so nothing larger than the result is held."""
    table = store.docs
    out = np.empty((len(docs), n_features), np.float32)
    for first in range(0, len(docs), block):
        ids, rows = [], []
        for row, doc in enumerate(docs[first:first + block]):
            start = int(table.token_start[doc])
            ids.append(np.asarray(store.token_ids(start, start + int(table.n_tokens[doc]))).astype(np.int64)
                       % n_features)
            rows.append(np.full(len(ids[-1]), row, np.int64))
        n = len(rows)
        flat = np.concatenate(rows) * n_features + np.concatenate(ids)
        part = np.log1p(np.bincount(flat, minlength=n * n_features).reshape(n, n_features).astype(np.float32))
        part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        out[first:first + n] = part
    return out


def bag_of_tokens(store: ActivationStore, names: tuple[str, ...], fit_split: str, eval_splits: tuple[str, ...],
                  n_features: int = N_FEATURES, l2: float = 1e-4, steps: int = 300, seed: int = 0,
                  max_docs: int = MAX_DOCS, chunk_docs: int = 4096) -> dict:
    """{split: readout_metrics} of a bag-of-tokens logistic regression fitted on (at most `max_docs` of)
    `fit_split`'s documents of `names` (full batch, Adam), for every split of `eval_splits` the store holds."""
    class_of = {store.label_ids[n]: c for c, n in enumerate(names)}
    labels_all = np.array([class_of.get(int(i), -1) for i in store.docs.label_id])

    def split_docs(split):
        docs = store.select(split)
        docs = docs[labels_all[docs] >= 0]
        return docs, labels_all[docs]

    docs, labels = split_docs(fit_split)
    n_fit = len(docs)
    if n_fit > max_docs:
        keep = np.sort(np.random.default_rng(seed).choice(n_fit, max_docs, replace=False))
        docs, labels = docs[keep], labels[keep]
    x = jnp.asarray(token_counts(store, docs, n_features))
    y = jax.nn.one_hot(labels, len(names))
    params = {"w": jnp.zeros((n_features, len(names))), "b": jnp.zeros(len(names))}
    optimizer = optax.adam(0.05)

    def loss(p, x, y):
        logits = x @ p["w"] + p["b"]
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), -1)) + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def step(p, state, x, y):  # the counts are arguments, not constants folded into the compiled step
        grads = jax.grad(loss)(p, x, y)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state, x, y)
    del x, y
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    fitted_on = f"{fit_split}" if len(docs) == n_fit else f"a seeded sample of {len(docs)} of {fit_split}'s {n_fit}"
    out = {"method": f"logistic regression on log token counts ({n_features} features), fitted on {fitted_on} "
                     "documents",
           "fit_docs": len(docs)}
    for split in eval_splits:
        if split not in SPLIT_CODES:
            continue
        docs, labels = split_docs(split)
        if len(docs):
            logits = np.concatenate([token_counts(store, docs[i:i + chunk_docs], n_features) @ w + b
                                     for i in range(0, len(docs), chunk_docs)])
            out[split] = readout_metrics(logits, labels)
    return out
