"""What a trivial reader gets on the same splits: the yardstick the fit's accuracies are read against.

`bag_of_tokens`: a multinomial logistic regression on each document's token counts (the store's token ids, so
the model's own tokenizer defines the words), trained on the fit split and scored with the same metrics and
bootstrap intervals as the concept vectors. A concept vector that does no better than this has learned the
words of its stories, not a representation of the emotion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emojax.concepts.evaluate import readout_metrics
from emojax.store.reader import ActivationStore
from emojax.store.state import SPLIT_CODES


def token_counts(store: ActivationStore, docs: np.ndarray, n_features: int) -> np.ndarray:
    """[len(docs), n_features] float32: log(1 + count) of each token id (folded modulo n_features), rows
    scaled to unit norm."""
    table = store.docs
    out = np.zeros((len(docs), n_features), np.float32)
    for row, doc in enumerate(docs):
        start = int(table.token_start[doc])
        np.add.at(out[row], store.token_ids(start, start + int(table.n_tokens[doc])) % n_features, 1.0)
    out = np.log1p(out)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def bag_of_tokens(store: ActivationStore, names: tuple[str, ...], fit_split: str, eval_splits: tuple[str, ...],
                  n_features: int = 4096, l2: float = 1e-4, steps: int = 300, seed: int = 0) -> dict:
    """{split: readout_metrics} of a bag-of-tokens logistic regression fitted on `fit_split`'s documents of
    `names` (full batch, Adam), for every split of `eval_splits` the store holds."""
    class_of = {store.label_ids[n]: c for c, n in enumerate(names)}
    labels_all = np.array([class_of.get(int(i), -1) for i in store.docs.label_id])

    def split_docs(split):
        docs = store.select(split)
        docs = docs[labels_all[docs] >= 0]
        return docs, labels_all[docs]

    docs, labels = split_docs(fit_split)
    x = jnp.asarray(token_counts(store, docs, n_features))
    y = jax.nn.one_hot(labels, len(names))
    params = {"w": jnp.zeros((n_features, len(names))), "b": jnp.zeros(len(names))}
    optimizer = optax.adam(0.05)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), -1)) + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    out = {"method": f"logistic regression on log token counts ({n_features} features), fitted on {fit_split}"}
    for split in eval_splits:
        if split not in SPLIT_CODES:
            continue
        docs, labels = split_docs(split)
        if len(docs):
            logits = np.asarray(token_counts(store, docs, n_features) @ np.asarray(params["w"]) + params["b"])
            out[split] = readout_metrics(logits, labels)
    return out
