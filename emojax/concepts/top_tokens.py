"""Top-activating tokens on held-out text (the study's first validation): for each concept, the tokens of a
held-out split whose readout lies above the concept's 90th percentile, and whether they sit in that concept's
documents more often than chance.

    result = top_activating_tokens(store, bank, layer, split="test", percentile=90)

Every token of the split's documents is read (each document's first token left out where the store records
that its tokenizer adds a BOS; padding is never stored), with the fit's readout cos(x - center, v_c)
(`concept_readout`). Per concept c:

    threshold_c   the `percentile` of c's readout over the split's tokens: exact over all of them when the split
                  holds at most `threshold_tokens`, else over a seeded uniform sample of that many tokens
    above_c       the tokens whose readout exceeds threshold_c (all of the split's tokens, not the sample)
    share_c       the fraction of above_c lying in documents labelled c
    base_c        the fraction of all scored tokens lying in documents labelled c
    lift_c        share_c / base_c: 1 when the top tokens ignore the label (chance), > 1 when they favour it

Intervals: percentile bootstrap 95% over the split's documents (resampled with replacement, seeded), thresholds
held fixed. Tokens of one document are not independent, so the document is the unit resampled, and a concept
with fewer than MIN_CI_DOCUMENTS documents in the split gets no interval of its own (resampling one document
only reweights it, which would give a falsely narrow interval). The summary is the mean lift over the concepts
that have documents in the split, with its interval over the same resamples (each resample averaging the
concepts it holds documents of).
Reads stream `chunk_rows` token rows at a time; what is kept is per-document counts [documents, C], the sample's
readouts [threshold_tokens, C] and each concept's best `examples` tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emojax.concepts.bank import ConceptBank
from emojax.concepts.evaluate import concept_readout
from emojax.progress import progress_bar
from emojax.store.arrays import StoreError
from emojax.store.reader import NEUTRAL_ID, ActivationStore
from emojax.store.state import SPLIT_CODES
from emojax.tokenizer import Tokenizer, load_tokenizer

BOOT_BATCH = 100  # bootstrap resamples computed at once (a [BOOT_BATCH, documents] weight matrix)
MIN_CI_DOCUMENTS = 5  # documents of a concept below which its lift gets no interval


@dataclass(frozen=True)
class Spans:
    """The scored token rows of a split: document i of the split (index `docs[i]` into store.docs) holds store
    rows [starts[i], ends[i]); sorted by start, documents without a scored token left out."""

    docs: np.ndarray  # [X] int64
    starts: np.ndarray  # [X] int64
    ends: np.ndarray  # [X] int64

    @property
    def tokens(self) -> int:
        return int((self.ends - self.starts).sum())


def bos_left_out(store: ActivationStore) -> bool:
    """Whether the store records that its tokenizer puts a BOS first in every document (as the dump records it
    for the pooled means and TokenBatches reads it): then each document's first row is that BOS."""
    pooling = ((store.state.get("fingerprints") or {}).get("capture") or {}).get("pooling") or {}
    return pooling.get("bos_id_left_out") is not None


def split_spans(store: ActivationStore, split: str) -> Spans:
    """The token rows of every document of `split` (all labels, neutral included), BOS left out."""
    docs = store.docs
    index = store.select(split)
    starts = docs.token_start[index].astype(np.int64) + int(bos_left_out(store))
    ends = docs.token_start[index].astype(np.int64) + docs.n_tokens[index]
    keep = ends > starts
    order = np.argsort(starts[keep], kind="stable")
    return Spans(index[keep][order].astype(np.int64), starts[keep][order], ends[keep][order])


def iter_token_chunks(store: ActivationStore, layer: int, spans: Spans,
                      chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(store rows [n], span index [n], activations [n, D] float32) of the spans' rows in store order, read in
    aligned blocks of `chunk_rows` store rows (a read never spans more, however the split's documents are
    interleaved with others')."""
    if not len(spans.docs):
        return
    first, last = spans.starts // chunk_rows, (spans.ends - 1) // chunk_rows
    blocks = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))
    for k in blocks:
        lo, hi = int(k) * chunk_rows, (int(k) + 1) * chunk_rows
        i0, i1 = np.searchsorted(spans.ends, lo, side="right"), np.searchsorted(spans.starts, hi)
        a, b = np.maximum(spans.starts[i0:i1], lo), np.minimum(spans.ends[i0:i1], hi)
        rows = np.concatenate([np.arange(s, e) for s, e in zip(a, b)])
        pos = np.repeat(np.arange(i0, i1), b - a)
        acts = store.tokens(layer, int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]].astype(np.float32)
        yield rows, pos, acts


def store_tokenizer(store: ActivationStore, model: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer the store's corpus was tokenized with, to decode its token ids: that of `model` (a
    checkpoint folder; default the model store.json names) or the byte tokenizer, whichever has the fingerprint
    the store recorded. None when neither matches (examples are then shown as token ids); a store that records
    no fingerprint takes the first one found."""
    recorded = (store.state.get("fingerprints") or {}).get("tokenizer")
    candidates = []
    folder = Path(str(model or store.state.get("model") or ""))
    if str(folder) and (folder / "tokenizer.json").is_file():
        candidates.append(load_tokenizer(folder))
    candidates.append(load_tokenizer("byte"))
    for tokenizer in candidates:
        if recorded is None or tokenizer.fingerprint == recorded:
            return tokenizer
    return None


def top_activating_tokens(store: ActivationStore, bank: ConceptBank, layer: int, split: str = "test",
                          percentile: float = 90.0, examples: int = 5, context: int = 6,
                          tokenizer: Tokenizer | None = None, threshold_tokens: int = 100_000, n_boot: int = 1000,
                          seed: int = 0, chunk_rows: int = 16384, concepts: tuple[str, ...] | None = None,
                          show_progress: bool = True) -> dict:
    """Each concept's tokens above its `percentile` on `split` and their lift over its documents' share of the
    tokens (module docstring), JSON-ready. `concepts`: a subset of the bank's (default all)."""
    store.check_layer(layer)
    if bank.d_model != store.d_model:
        raise StoreError(f"{store.path}: d_model {store.d_model}, but the bank {bank.source or ''} has "
                         f"{bank.d_model}; use the store the bank was fitted on")
    names = tuple(concepts) if concepts else bank.names
    idx = [bank.concept_index(n) for n in names]
    vectors_CD = bank.at_layer(layer)[idx].astype(np.float32)
    center_D = bank.center[bank.layer_index(layer)].astype(np.float32) if bank.center is not None else None
    spans = split_spans(store, split)
    n_tokens = spans.tokens
    if not n_tokens:
        held = sorted(name for name, code in SPLIT_CODES.items() if (store.docs.split == code).any())
        raise StoreError(f"{store.path}: split {split!r} holds no token rows to read; the store's splits are {held} "
                         "(set validate.split, or --split, to one of them)")
    C = len(names)

    def readout(acts):
        return concept_readout(acts, vectors_CD, center_D)

    # Pass 1: the thresholds, over all tokens or a seeded uniform sample of them.
    sample = None
    if n_tokens > threshold_tokens:
        sample = np.sort(np.random.default_rng(seed).choice(n_tokens, threshold_tokens, replace=False))
    kept, seen = [], 0
    with progress_bar(f"top tokens: {split} percentiles", n_tokens, enabled=show_progress) as update:
        for rows, _, acts in iter_token_chunks(store, layer, spans, chunk_rows):
            if sample is None:
                kept.append(readout(acts).astype(np.float32))
            else:
                take = sample[np.searchsorted(sample, seen):np.searchsorted(sample, seen + len(rows))] - seen
                if len(take):
                    kept.append(readout(acts[take]).astype(np.float32))
            seen += len(rows)
            update(advance=len(rows))
    threshold_C = np.percentile(np.concatenate(kept), percentile, axis=0)
    del kept

    # Pass 2: per document, how many of its tokens lie above each concept's threshold; the best examples.
    above_XC = np.zeros((len(spans.docs), C), np.int32)
    k = max(examples, 1)
    best_score = np.full((k, C), -np.inf)
    best_row = np.full((k, C), -1, np.int64)
    best_pos = np.full((k, C), -1, np.int64)
    with progress_bar(f"top tokens: {split} counts", n_tokens, enabled=show_progress) as update:
        for rows, pos, acts in iter_token_chunks(store, layer, spans, chunk_rows):
            scores = readout(acts)
            firsts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
            above_XC[pos[firsts]] += np.add.reduceat((scores > threshold_C).astype(np.int32), firsts, axis=0)
            top = np.argsort(-scores, axis=0, kind="stable")[:k]
            cand_score = np.concatenate([best_score, np.take_along_axis(scores, top, 0)])
            cand_row, cand_pos = np.concatenate([best_row, rows[top]]), np.concatenate([best_pos, pos[top]])
            order = np.argsort(-cand_score, axis=0, kind="stable")[:k]
            best_score, best_row, best_pos = (np.take_along_axis(a, order, 0) for a in (cand_score, cand_row,
                                                                                         cand_pos))
            update(advance=len(rows))

    n_X = (spans.ends - spans.starts).astype(np.int64)
    label_X = store.docs.label_id[spans.docs]
    class_X = np.full(len(spans.docs), -1, np.int64)
    for c, name in enumerate(names):
        if name in store.label_ids:
            class_X[label_X == store.label_ids[name]] = c
    lift = lift_statistics(above_XC, n_X, class_X, n_boot, seed)
    per_concept = {}
    for c, name in enumerate(names):
        entry = {"threshold": float(threshold_C[c]), **{key: value[c] for key, value in lift["per_concept"].items()}}
        entry["examples"] = [_example(store, spans, tokenizer, int(best_row[j, c]), int(best_pos[j, c]),
                                      float(best_score[j, c]), context)
                             for j in range(min(examples, n_tokens))]
        per_concept[name] = entry
    return {
        "split": split, "layer": int(layer), "percentile": float(percentile), "tokens": n_tokens,
        "documents": int(len(spans.docs)), "bos_left_out": bos_left_out(store),
        "threshold_sample": {"tokens": n_tokens if sample is None else int(threshold_tokens),
                             "exact": sample is None, "seed": int(seed)},
        "readout": "cos(x - center, v_c) (the fit's readout)", "n_boot": int(n_boot), "chance_lift": 1.0,
        "tokenizer": "token ids (no tokenizer matches the store)" if tokenizer is None else tokenizer.source,
        "summary": lift["summary"], "concepts": per_concept,
    }


def lift_statistics(above_XC: np.ndarray, tokens_X: np.ndarray, class_X: np.ndarray, n_boot: int = 1000,
                    seed: int = 0) -> dict:
    """Lift of each concept's above-threshold tokens towards its own documents, with document-bootstrap 95%
    intervals. above_XC [X, C]: tokens of document X above concept C's threshold; tokens_X [X]: its scored
    tokens; class_X [X]: its concept (0..C-1), or -1 (neutral, or a label not read). A concept without documents
    or without tokens above its threshold has lift None; one with fewer than MIN_CI_DOCUMENTS documents no
    interval."""
    X, C = above_XC.shape
    onehot_XC = class_X[:, None] == np.arange(C)[None, :]
    own_X = np.where(class_X >= 0, above_XC[np.arange(X), np.maximum(class_X, 0)], 0)
    inside_XC = onehot_XC * own_X[:, None]
    tokens_XC = onehot_XC * tokens_X[:, None]

    def lifts(w_BX):  # [B, X] document weights -> lift [B, C]
        above, inside = w_BX @ above_XC, w_BX @ inside_XC
        share_tokens = (w_BX @ tokens_XC) / np.maximum(w_BX @ tokens_X, 1)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (inside / above) / share_tokens
        return np.where((above > 0) & (share_tokens > 0), out, np.nan)

    point = lifts(np.ones((1, X)))[0]
    defined = ~np.isnan(point)
    draws = []
    if n_boot and X > 1:
        rng = np.random.default_rng(seed)
        for start in range(0, n_boot, BOOT_BATCH):
            w = rng.multinomial(X, np.full(X, 1 / X), size=min(BOOT_BATCH, n_boot - start)).astype(np.float64)
            draws.append(lifts(w))
    draws_BC = np.concatenate(draws) if draws else np.zeros((0, C))
    above_C, inside_C = above_XC.sum(0), inside_XC.sum(0)
    tokens_C, total = tokens_XC.sum(0), max(int(tokens_X.sum()), 1)
    docs_C = onehot_XC.sum(0)
    per_concept = {
        "above": [int(v) for v in above_C],
        "in_label": [int(v) for v in inside_C],
        "share_in_label": [float(i / a) if a else None for i, a in zip(inside_C, above_C)],
        "base_rate": [float(t / total) for t in tokens_C],
        "lift": [float(v) if d else None for v, d in zip(point, defined)],
        "lift_ci95": [_interval(draws_BC[:, c]) if defined[c] and docs_C[c] >= MIN_CI_DOCUMENTS else None
                      for c in range(C)],
        "documents": [int(v) for v in docs_C],
    }
    summary: dict = {"concepts": int(defined.sum()), "chance": 1.0, "mean_lift": None, "mean_lift_ci95": None,
                     "with_interval": 0, "above_chance": 0, "below_chance": 0}
    if defined.any():
        summary["mean_lift"] = float(point[defined].mean())
        if len(draws_BC):
            with warnings.catch_warnings():  # a resample may hold no document of any concept: nanmean skips it
                warnings.simplefilter("ignore", RuntimeWarning)
                summary["mean_lift_ci95"] = _interval(np.nanmean(draws_BC[:, defined], axis=1))
        for ci in per_concept["lift_ci95"]:
            if ci is not None:
                summary["with_interval"] += 1
                summary["above_chance"] += ci[0] > 1.0
                summary["below_chance"] += ci[1] < 1.0
    return {"per_concept": per_concept, "summary": summary}


def _interval(draws: np.ndarray) -> list[float] | None:
    """Percentile 95% interval of the finite draws; None when there are none."""
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return None
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def _example(store: ActivationStore, spans: Spans, tokenizer: Tokenizer | None, row: int, pos: int, score: float,
             context: int) -> dict:
    """One top token with up to `context` tokens of its document either side (the BOS left out)."""
    lo, hi = max(int(spans.starts[pos]), row - context), min(int(spans.ends[pos]), row + 1 + context)
    ids = store.token_ids(lo, hi).astype(np.int64)
    label = int(store.docs.label_id[spans.docs[pos]])
    name = "neutral" if label == NEUTRAL_ID else store.label_names.get(label, str(label))

    def text(part):
        if tokenizer is None:
            return "".join(f"<{int(i)}>" for i in part)
        return tokenizer.decode([int(i) for i in part], skip_special_tokens=False)

    return {"score": score, "label": name, "left": text(ids[:row - lo]), "token": text(ids[row - lo:row - lo + 1]),
            "right": text(ids[row - lo + 1:])}
