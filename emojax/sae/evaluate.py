"""The SAE stage, shared by `emojax sae` and `emojax run`: train the configured SAE(s), export each SAELens-style,
and evaluate them on held-out documents.

    summary, metrics = train_and_evaluate(config)

Writes under config.out: sae_<i>/ (each SAE, see export.py); metrics.json, one entry per SAE: reconstruction
(L0, FVU, MSE, cosine) on up to 256 test documents of the store (a seeded uniform sample, first tokens left out),
the dead fraction, the spliced-in LM loss on 16 test documents when config.model names the model, and each
concept's best-matching latent when config.bank holds a bank with config.layer. One writer holds config.out throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from emojax.concepts.bank import load_bank
from emojax.errors import ConfigError
from emojax.fileio import write_json
from emojax.locks import WriterLock
from emojax.models import load_model
from emojax.sae.config import SaeConfig
from emojax.sae.export import export_sae
from emojax.sae.metrics import (bank_max_cosine, dead_fraction, evaluate_batches, heldout_docs, heldout_tokens,
                                spliced_metrics)
from emojax.sae.train import TrainResult, train_sae
from emojax.store.reader import ActivationStore


def train_and_evaluate(config: SaeConfig, log: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """Trains, exports and evaluates config's SAE(s) (resuming from config.out's checkpoints); returns the
    training summary (steps, tokens, seconds, each SAE's last logged metrics) and the metrics (metrics.json).
    log: training progress lines (None: quiet)."""
    if not config.store or not config.out:
        raise ConfigError("sae.store and sae.out must be set (in the config file or as store=... out=...)")
    out = Path(config.out)
    store = ActivationStore(config.store)
    with WriterLock(config.out, what="SAE output"):  # train_sae re-enters it
        result = train_sae(config, log=log)
        folders = [export_sae(result.sae(i), out / f"sae_{i}", hook_layer=config.layer,
                              extra={"sweep": config.sweep, "value": _sweep_value(config, i),
                                     "model_identity": store.state.get("model_identity")})
                   for i in range(config.n_sae)]
        metrics = evaluate_saes(result, store, folders)
        write_json(out / "metrics.json", metrics)
        last = result.history[-1] if result.history else {}
        summary = {"steps": config.steps, "tokens": result.tokens, "seconds": result.seconds,
                   "input_scale": result.input_scale,
                   "saes": [{"folder": str(folder), **{k: v[i] for k, v in last.items() if isinstance(v, list)}}
                            for i, folder in enumerate(folders)]}
    return summary, metrics


def _sweep_value(config: SaeConfig, i: int) -> float | None:
    return config.values(config.sweep)[i] if config.sweep else None


def evaluate_saes(result: TrainResult, store: ActivationStore, folders: list[Path]) -> list[dict]:
    """One metrics entry per SAE of `result` (exported to `folders`), on the store's test split."""
    config = result.config
    # Each document's first token (the BOS where the tokenizer adds one) is left out, as in spliced_metrics.
    held = [store.document_tokens(config.layer, int(i))[1:].astype(np.float32)
            for i in heldout_docs(store, "test", 256, config.seed)]
    held = [x for x in held if len(x)]
    lm = load_model(config.model) if config.model else None
    tokens, mask = heldout_tokens(store, "test", 16, seed=config.seed) if lm is not None else (None, None)
    bank = load_bank(config.bank) if config.bank and (Path(config.bank) / "bank.json").is_file() else None
    if bank is not None and config.layer not in bank.layers:
        bank = None
    entries = []
    for i, folder in enumerate(folders):
        sae = result.sae(i)
        value = _sweep_value(config, i)
        entry = {"name": config.variant + (f" {config.sweep}={value:g}" if config.sweep else f" k={config.k}"),
                 "folder": str(folder), "layer": config.layer, **evaluate_batches(sae, held),
                 "dead_fraction": dead_fraction(np.asarray(result.state["stats"]["since_fired"][i]),
                                                config.dead_window_tokens)}
        if lm is not None:
            entry.update(spliced_metrics(lm, sae, config.layer, tokens, mask))
        if bank is not None:
            matches = bank_max_cosine(bank, config.layer, sae)
            entry["bank_max_cosine"] = {k: round(v[0], 4) for k, v in matches.items()}
            entry["bank_mean_max_cosine"] = float(np.mean([v[0] for v in matches.values()]))
        entries.append(entry)
    return entries
