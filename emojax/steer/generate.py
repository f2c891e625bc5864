"""Generation from a concept bank: steered (`steer`), monitored token by token (`monitor`), and the one monitored
sample the run's report shows (`monitored_generation`).

The layer defaults to emojax.concepts.layer's choice (the fit's best layer, else the one nearest two-thirds of
the depth). A bank fitted on another model (other weights, even of the same shape) is refused unless force.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np

from emojax.concepts.bank import ConceptBank, check_model
from emojax.concepts.layer import bank_layer
from emojax.errors import InputError
from emojax.models.lm import LanguageModel
from emojax.steer.decode import Decoder
from emojax.steer.interventions import from_bank
from emojax.steer.monitor import AlertTracker, Rule, monitor_metric, readout_from_bank
from emojax.steer.sampling import Sampling
from emojax.steer.text import encode_prompts, token_texts, tokenizer_for


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def check_bank_model(lm: LanguageModel, bank: ConceptBank, force: bool = False,
                     warn: Callable[[str], None] | None = None) -> None:
    """Raises BankModelError when `bank` was fitted on a model other than `lm` (compared by content, see
    emojax.concepts.bank.check_model), unless force; what cannot be checked (or is forced) goes to `warn`
    (default: warnings.warn)."""
    message = check_model(bank, lm.identity, lm.source or "this model", force=force)
    if message:
        (warn or _warn)(message)


def steer(lm: LanguageModel, bank: ConceptBank, prompts: Sequence[str], concepts: Sequence[str],
          strengths: Sequence[Sequence[float]], *, layers: Sequence[int] | None = None, positions: str = "all",
          unit: str = "norm", max_new_tokens: int = 48, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, seed: int = 0, decoder: Decoder | None = None, force: bool = False,
          warn: Callable[[str], None] | None = None) -> list[dict]:
    """Generates every prompt under every strength setting, as one batch.

    strengths: one row per setting, one value per concept (a sweep is several rows). Returns one record per
    (setting, prompt) with the prompt, the strengths and the generated text. A bank fitted on another model is
    refused (BankModelError) unless force=True (see check_bank_model).
    """
    check_bank_model(lm, bank, force, warn)
    settings = np.asarray(strengths, np.float32)
    if settings.ndim != 2 or settings.shape[1] != len(concepts):
        raise InputError(f"need one strength per concept ({len(concepts)}), got {settings.shape[-1]}")
    for name in concepts:
        bank.concept_index(name)
    layers = tuple(layers) if layers else (bank_layer(bank, lm.config.n_layers),)
    tokenizer = tokenizer_for(lm)
    tokens, mask = encode_prompts(tokenizer, prompts)
    n_p = len(prompts)
    per_row = np.repeat(settings, n_p, axis=0)  # row = setting * n_p + prompt
    iv = from_bank(bank, lm.config.n_layers, concepts, per_row, layers=layers, positions=positions, unit=unit)
    decoder = decoder or Decoder(lm)
    B = len(per_row)
    gen = decoder.generate(np.tile(tokens, (len(settings), 1)), np.tile(mask, (len(settings), 1)),
                           max_new_tokens=max_new_tokens, interventions=iv,
                           sampling=Sampling.make(B, temperature, top_k, top_p) if temperature > 0 else None,
                           key=jax.random.key(seed))
    records = []
    for b in range(B):
        records.append({"prompt": prompts[b % n_p], "concepts": list(concepts),
                        "strengths": [float(s) for s in per_row[b]], "layers": list(layers), "unit": unit,
                        "positions": positions, "tokens": gen.generated(b),
                        "text": tokenizer.decode(gen.generated(b))})
    return records


def monitor(lm: LanguageModel, bank: ConceptBank, prompts: Sequence[str], *, layer: int | None = None,
            metric: str | None = None, max_new_tokens: int = 32, rules: Sequence[Rule] = (), top: int = 3,
            on_alert=None, decoder: Decoder | None = None, force: bool = False,
            warn: Callable[[str], None] | None = None) -> list[dict]:
    """Generates from each prompt and reads every token's projections onto the bank's concepts.

    Returns one record per prompt: tokens with their text, source (prompt/generated), readings [C] and top
    concepts, plus the alerts of `rules`. Alerts are evaluated while the readings stream in (on_alert(alert)).
    A bank fitted on another model is refused (BankModelError) unless force=True (see check_bank_model).
    """
    check_bank_model(lm, bank, force, warn)
    layer = bank_layer(bank, lm.config.n_layers, layer)
    metric = monitor_metric(bank, layer, metric)  # z-scores against neutral text for a calibrated bank
    readout, names = readout_from_bank(bank, layer, metric)
    tracker = AlertTracker(rules, names)
    tokenizer = tokenizer_for(lm)
    tokens, mask = encode_prompts(tokenizer, prompts)
    decoder = decoder or Decoder(lm)

    def on_readings(positions, readings):
        for alert in tracker.feed(positions, readings):
            if on_alert is not None:
                on_alert(alert)

    gen = decoder.generate(tokens, mask, max_new_tokens=max_new_tokens, readout=readout,
                           on_readings=on_readings if rules else None)
    readings, valid = np.asarray(gen.readings), np.asarray(gen.valid)
    records = []
    for b, prompt in enumerate(prompts):
        cols = np.nonzero(valid[b])[0]
        ids = [int(t) for t in np.asarray(gen.tokens)[b, cols]]
        rows = []
        for pos, (col, text) in enumerate(zip(cols, token_texts(tokenizer, ids))):
            r = readings[b, col]
            best = np.argsort(-r, kind="stable")[:top]
            rows.append({"position": pos, "token": ids[pos], "text": text,
                         "source": "prompt" if col < gen.prompt_columns else "generated",
                         "readings": {n: float(v) for n, v in zip(names, r)},
                         "top": [[names[i], float(r[i])] for i in best]})
        records.append({"prompt": prompt, "layer": int(layer), "metric": metric,
                        "generated": tokenizer.decode(gen.generated(b)), "tokens": rows,
                        "alerts": [a.to_dict() for a in tracker.alerts() if a.row == b]})
    return records


def monitored_generation(lm: LanguageModel, bank: ConceptBank, prompt: str, layer: int, max_new_tokens: int,
                         decoder: Decoder | None = None, warn: Callable[[str], None] | None = None) -> dict:
    """`monitor` of one prompt as the report shows it: the text, the token texts, the readings [tokens][concepts]
    of every bank concept at `layer` (5 decimals; z-scores against neutral text for a calibrated bank, the
    unit in "metric") and the prompt's token count."""
    (record,) = monitor(lm, bank, [prompt], layer=layer, max_new_tokens=max_new_tokens, decoder=decoder, warn=warn)
    rows = record["tokens"]
    readings = np.asarray([list(t["readings"].values()) for t in rows], np.float32)  # float32, as decoded
    return {"text": tokenizer_for(lm).decode([t["token"] for t in rows]), "tokens": [t["text"] for t in rows],
            "concepts": list(bank.names), "readings": np.round(readings, 5).tolist(), "layer": layer,
            "metric": record["metric"],
            "prompt_tokens": sum(t["source"] == "prompt" for t in rows)}
