"""Does a world model hold the emotion of an implicit scenario as a linear state, and along its stories'
directions? On a run's store (RUN/activations), at each dumped layer, averaged over the scenario and at its last
token (the ':' after "Assistant"):

- nearest centroid fitted on one half of the implicit scenarios (alternate documents of each emotion), read on
  the other half: what a direction fitted on the scenarios themselves finds;
- the same read with the centroids of the train-split fit stories: what the stories' directions find;
- the cosine between the two centroids of each emotion (each centred on its own set's mean).

    python scripts/implicit_readout.py runs/world_small/activations

Figures are top-1 rates with a 95% Wilson interval (docs/world.md, "A smaller world").
"""

from __future__ import annotations

import argparse

import numpy as np

from emojax.experiment.stats import wilson
from emojax.store import ActivationStore


def centroids(X_ND: np.ndarray, y_N: np.ndarray, labels: list[int]) -> np.ndarray:
    """[C, D] unit vectors: each label's mean minus the mean of all rows."""
    C_CD = np.stack([X_ND[y_N == label].mean(0) for label in labels]) - X_ND.mean(0)
    return C_CD / np.linalg.norm(C_CD, axis=1, keepdims=True)


def rate(predicted: np.ndarray, truth: np.ndarray) -> str:
    k, n = int((predicted == truth).sum()), len(truth)
    lo, hi = wilson(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="a run's activation store (RUN/activations)")
    store = ActivationStore(parser.parse_args().store)
    docs = store.docs
    implicit = store.select("implicit")
    y_N = docs.label_id[implicit]
    labels = sorted(set(y_N.tolist()))
    fit_half = np.zeros(len(y_N), bool)  # alternate documents of each emotion
    for label in labels:
        fit_half[np.flatnonzero(y_N == label)[::2]] = True
    stories = store.select("train")
    stories = stories[np.isin(docs.label_id[stories], labels)]
    print(f"{len(y_N)} implicit scenarios of {len(labels)} emotions (chance top-1 {1 / len(labels):.3f}); "
          f"{len(stories)} train stories")
    for layer in store.layers:
        for pool in ("mean", "last"):
            def acts(index: np.ndarray) -> np.ndarray:
                if pool == "mean":
                    return store.pooled(layer, docs.rows[index]).astype(np.float64)
                return np.stack([store.document_tokens(layer, int(i))[-1].astype(np.float64) for i in index])

            X_ND, read = acts(implicit), ~fit_half
            own_CD = centroids(X_ND[fit_half], y_N[fit_half], labels)
            story_CD = centroids(acts(stories), docs.label_id[stories], labels)
            centred = X_ND[read] - X_ND[read].mean(0)
            own = np.asarray(labels)[np.argmax(centred @ own_CD.T, 1)]
            by_stories = np.asarray(labels)[np.argmax(centred @ story_CD.T, 1)]
            cos_C = np.sum(own_CD * story_CD, 1)
            print(f"layer {layer}, {pool}: scenarios' own centroids {rate(own, y_N[read])}; stories' "
                  f"{rate(by_stories, y_N[read])}; cosine of the two per emotion {cos_C.mean():.2f} "
                  f"({cos_C.min():.2f} to {cos_C.max():.2f}); n = {int(read.sum())}")


if __name__ == "__main__":
    main()
