"""The fit stage: concept vectors per layer from the activation store, their geometry and held-out evaluation.

    bank = fit(FitConfig(store="runs/x/activations", out="runs/x/bank"))

Writes to `out`: bank.safetensors + bank.json (the ConceptBank), eval.json (per-layer metrics, geometry,
logit lens, best layer) and probes.safetensors (probe weights [L, C, D] and biases [L, C], when probes were
trained), each atomically. Every pass over the store streams `chunk_docs` rows at a time over the mesh.

The bank records the content identity of the model the store was dumped with (store.json's `model_identity`,
else that of fit.model), so steering and monitoring can refuse it on another model. Statistics holding NaN or
inf are refused with the layer and label, never written into a bank.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from emojax.concepts import alternatives, recipe
from emojax.concepts.baselines import bag_of_tokens
from emojax.concepts.bank import ConceptBank
from emojax.concepts.config import FitConfig
from emojax.concepts.evaluate import (concept_readout, last_token_scores, logit_lens, neutral_calibration,
                                      readout_metrics, split_scores)
from emojax.concepts.geometry import layer_geometry
from emojax.concepts.layer import best_layer
from emojax.concepts.recipe import FitError
from emojax.concepts.stats import LabelStats, fit_mesh, label_stats, mean_token_norm, neutral_token_stats
from emojax.fileio import atomic_path, write_text
from emojax.models.identity import describe_difference, same_model
from emojax.store.reader import NEUTRAL_ID, ActivationStore
from emojax.store.state import SPLIT_CODES


def resolve_labels(store: ActivationStore, labels: tuple[str, ...]) -> tuple[str, ...]:
    """The concepts to fit, in label-id order (default: every non-neutral label with documents in the store;
    the label table lists the whole catalogue, a corpus may use part of it)."""
    if labels:
        unknown = [n for n in labels if n not in store.label_ids]
        if unknown:
            raise FitError(f"fit.labels: {unknown} are not in the store's labels ({store.path}/store.json)")
        return tuple(labels)
    present = set(np.unique(store.docs.label_id).tolist())
    names = tuple(n for n, i in sorted(store.label_ids.items(), key=lambda kv: kv[1])
                  if i != NEUTRAL_ID and i in present)
    if not names:
        raise FitError(f"{store.path}: the store has no concept labels")
    return names


def _check_splits(config: FitConfig) -> None:
    for key in ("fit_split", "neutral_split", "probe_val_split"):
        if getattr(config, key) not in SPLIT_CODES:
            raise FitError(f"fit.{key}={getattr(config, key)!r} is not a split ({list(SPLIT_CODES)})")
    bad = [s for s in config.eval_splits if s not in SPLIT_CODES]
    if bad:
        raise FitError(f"fit.eval_splits: {bad} are not splits ({list(SPLIT_CODES)})")


def fit(config: FitConfig, log: Callable[[str], None] | None = None) -> ConceptBank:
    """Fits the concept bank of `config.store` and writes it (with eval.json) to `config.out`."""
    log = log or (lambda _msg: None)
    _check_splits(config)
    store = ActivationStore(config.store)
    layers = tuple(int(i) for i in (config.layers or store.layers))
    for layer in layers:
        store.check_layer(layer)
    names = resolve_labels(store, config.labels)
    unused = [n for n, i in store.label_ids.items() if i != NEUTRAL_ID and n not in names]
    if unused and not config.labels:
        log(f"fit: {len(unused)} label(s) of the store's table have no documents and are not fitted")
    mesh = fit_mesh(config.mesh)
    lm = None
    if config.model:
        from emojax.models import load_model

        lm = load_model(config.model)
        if lm.config.d_model != store.d_model:
            raise FitError(f"fit.model={config.model!r} has d_model {lm.config.d_model}, the store "
                           f"{store.d_model}; use the model the store was dumped with")
    identity = _model_identity(store, config, lm)

    raws, vectors, centers, pcs, norms, probes, calibration = [], [], [], [], [], [], []
    per_layer: dict[int, dict] = {}
    for layer in layers:
        log(f"fit: layer {layer}: statistics")
        stats = label_stats(store, layer, config.fit_split, names, mesh, config.chunk_docs)
        recipe.check_counts(stats.counts_C, names, config.fit_split, layer)
        recipe.check_finite_rows(stats, names, config.fit_split, layer, store.path)
        recipe.check_finite(stats.means_CD, "label mean", layer, store.path, names)
        neutral, denoise_on = stats, None
        if config.denoise:
            neutral, denoise_on = _neutral_stats(store, layer, names, stats, config, mesh)
            recipe.check_finite_rows(neutral, names, config.neutral_split, layer, store.path,
                                     "tokens" if denoise_on == "tokens" else "docs")
        if config.denoise:
            recipe.check_finite(neutral.neutral_cov_DD, "neutral covariance", layer, store.path)
        if config.denoise and not neutral.neutral_count:
            raise FitError(f"{store.path}: no neutral documents in split {config.neutral_split!r} at layer {layer}, "
                           f"and fit.denoise=true needs them (denoise_variance={config.denoise_variance}); dump "
                           "the neutral set or set fit.denoise=false")
        raw, center = recipe.mean_diff(stats.means_CD)
        recipe.check_finite(center, "grand mean (the mean of the concept means)", layer, store.path)
        probe = None
        if config.method == "probe" or config.probe:
            log(f"fit: layer {layer}: probe")
            probe = alternatives.train_probe(
                store, layer, names, center, config.fit_split, config.probe_val_split, config.probe_l2,
                config.probe_lr, config.probe_epochs, config.probe_patience, config.probe_seed, mesh,
                config.chunk_docs)
        if config.method == "contrastive":
            raw = alternatives.contrastive(stats, config.negative, names)
        elif config.method == "pca_pairs":
            exclude = recipe.neutral_components(neutral.neutral_cov_DD, config.denoise_variance) \
                if config.denoise else None
            raw = alternatives.pca_pairs(store, layer, config.fit_split, names, stats, config.negative,
                                         config.pca_iters, mesh, config.chunk_docs, exclude)
        elif config.method == "probe":
            raw = alternatives.probe_vectors(probe)
        fitted = recipe.finish(raw, center, neutral.neutral_cov_DD, config.denoise, config.denoise_variance,
                               config.unit_norm)
        norm = mean_token_norm(store, layer, config.norm_tokens) if config.norm_tokens else float("nan")
        if not np.isfinite(norm):
            norm = stats.norm_mean  # no token rows: the pooled rows' norm
        recipe.check_finite(fitted.neutral_pcs_PD, "neutral principal components", layer, store.path)
        recipe.check_finite(fitted.raw_CD, f"{config.method} vector", layer, store.path, names)
        recipe.check_finite(fitted.vectors_CD, "denoised vector", layer, store.path, names)
        recipe.check_finite(norm, "mean residual norm", layer, store.path)
        raws.append(fitted.raw_CD)
        vectors.append(fitted.vectors_CD)
        centers.append(center)
        pcs.append(fitted.neutral_pcs_PD)
        norms.append(norm)
        probes.append(probe)
        per_layer[layer] = _evaluate_layer(store, layer, names, fitted, probe, config, lm)
        per_layer[layer].update({
            "resid_norm": float(norm), "n_fit": {n: int(c) for n, c in zip(names, stats.counts_C)},
            "denoise_on": denoise_on, "neutral_rows": int(neutral.neutral_count),
            "neutral_pcs": int(len(fitted.neutral_pcs_PD)),
        })
        calibration.append(neutral_calibration(store, layer, fitted.vectors_CD, center, config.neutral_split))
        per_layer[layer]["neutral_readout_tokens"] = calibration[-1][2]

    p_max = max(len(p) for p in pcs)
    neutral_pcs = None
    if p_max:
        neutral_pcs = np.zeros((len(layers), p_max, store.d_model), np.float32)
        for i, p in enumerate(pcs):
            neutral_pcs[i, :len(p)] = p
    settings = dataclasses.asdict(config)
    bank = ConceptBank(
        names=names, layers=layers, vectors=np.stack(vectors, 1).astype(np.float32),
        raw=np.stack(raws, 1).astype(np.float32), resid_norm=np.asarray(norms, np.float32),
        neutral_pcs=neutral_pcs, method=config.method, center=np.stack(centers).astype(np.float32),
        **_calibration(calibration),
        info={"store": store.path, "store_fingerprints": store.state.get("fingerprints", {}),
              "store_model": store.state.get("model"), "model_identity": identity, "settings": settings},
    )
    out = Path(config.out)
    bank.save(out)  # bank.safetensors first, then bank.json naming its checksum
    best = best_layer(per_layer)
    if best is None:
        log("fit: no validation figures (add 'val' to fit.eval_splits, and a val split to the corpus): steering and "
            "monitoring fall back to the layer nearest 2/3 of the depth")
    report = {"method": config.method, "concepts": list(names), "layers": list(layers),
              "best_layer": best, "best_by": "validation nearest-vector top-1 accuracy (test figures at that layer "
                                             "are held out from the choice)",
              "readout": "nearest: cos(x - center, v_c) with the bank's center and vectors; probe: x . w_c + b_c "
                         "(probes.safetensors)",
              "per_layer": {str(k): v for k, v in per_layer.items()},
              "baselines": {"bag_of_tokens": bag_of_tokens(store, names, config.fit_split, config.eval_splits,
                                                                 chunk_docs=config.chunk_docs)},
              "settings": settings}
    write_text(out / "eval.json", json.dumps(report, indent=1, default=_json_default) + "\n")
    if all(p is not None for p in probes):
        tensors = {"weights": np.stack([p.weights_CD for p in probes]), "bias": np.stack([p.bias_C for p in probes])}
        with atomic_path(out / "probes.safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp))
    log(f"fit: wrote {out} (best layer {best})")
    return bank


def _calibration(per_layer: list[tuple[np.ndarray, np.ndarray, int]]) -> dict:
    """The bank's neutral_mean / neutral_std [L, C] (the monitor's z-score reference), when every layer had
    neutral tokens to measure them on."""
    if not per_layer or any(n < 2 for _, _, n in per_layer):
        return {}
    return {"neutral_mean": np.stack([m for m, _, _ in per_layer]).astype(np.float32),
            "neutral_std": np.stack([s for _, s, _ in per_layer]).astype(np.float32)}


def _neutral_stats(store: ActivationStore, layer: int, names: tuple[str, ...], stats: LabelStats,
                   config: FitConfig, mesh) -> tuple[LabelStats, str]:
    """The neutral moments the denoising PCA is fitted on, and their rows: "tokens" (fit.denoise_on=tokens, each
    document's first token left out) or "documents" (pooled means; also for a store holding no neutral token rows,
    such as one written without them)."""
    if config.denoise_on == "tokens":
        tokens = neutral_token_stats(store, layer, config.neutral_split, mesh, config.chunk_docs)
        if tokens.neutral_count:
            return tokens, "tokens"
    if config.neutral_split == config.fit_split:
        return stats, "documents"
    return label_stats(store, layer, config.neutral_split, names, mesh, config.chunk_docs), "documents"


def _model_identity(store: ActivationStore, config: FitConfig, lm) -> dict | None:
    """The identity of the model the store was dumped with (store.json), else of fit.model; a fit.model that is
    not the store's model is refused: its logit lens would describe another model's vectors."""
    recorded = store.state.get("model_identity") or None
    given = lm.identity if lm is not None else None
    if recorded and given and not same_model(recorded, given):
        raise FitError(f"fit.model={config.model!r} is not the model {store.path} was dumped with "
                       f"({store.state.get('model')!r}: {describe_difference(recorded, given)}); set fit.model to "
                       "that model, or leave it empty to skip the logit lens")
    return recorded or given


def _evaluate_layer(store: ActivationStore, layer: int, names: tuple[str, ...], fitted: recipe.LayerVectors,
                    probe, config: FitConfig, lm) -> dict:
    readouts = {"nearest": lambda x: concept_readout(x, fitted.vectors_CD, fitted.center_D)}
    if probe is not None:
        readouts["probe"] = probe.logits
    result: dict = {}
    for split in config.eval_splits:
        scores, labels = split_scores(store, layer, split, names, readouts, config.chunk_docs)
        result[split] = {r: readout_metrics(s, labels) for r, s in scores.items()}
        if split == "implicit":  # also read where the study reads them: the ':' after "Assistant"
            scores, labels = last_token_scores(store, layer, split, names, readouts)
            result["implicit_at_assistant"] = {r: readout_metrics(s, labels) for r, s in scores.items()}
    if probe is not None:
        result["probe_training"] = {"epochs": probe.epochs, "best_epoch": probe.best_epoch,
                                    "val_loss": probe.val_loss}
    result["geometry"] = layer_geometry(names, fitted.vectors_CD, config.kmeans_k, config.kmeans_seed)
    if lm is not None:
        result["logit_lens"] = logit_lens(lm, fitted.vectors_CD, names, config.lens_top_k)
    return result


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
