"""The steering evaluation harness.

For each concept and strength, one batched decode (prompts x strengths) measures
  * logprob_shift: the change in mean log-probability of concept-congruent tokens (the top tokens of the
    concept vector's logit lens) at the first generated position, against strength 0;
  * readout: the cosine of the generated tokens' residual with the concept at a later bank layer;
  * perplexity: fluency of the steered text, scored by the unsteered model.
This is a manipulation check (does the steered text move toward the concept?); behavioural rates under steering
are emojax.experiment's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from emojax.concepts.bank import ConceptBank
from emojax.concepts.layer import bank_layer
from emojax.models.lm import LanguageModel
from emojax.steer.decode import Decoder, Generation
from emojax.steer.interventions import Positions, bank_direction, from_bank
from emojax.steer.monitor import Readout, readout_from_bank
from emojax.steer.text import encode_prompts, tokenizer_for


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def congruent_tokens(lm: LanguageModel, direction, n: int) -> np.ndarray:
    """The `n` token ids whose logits the direction [D] raises most: its logit lens (final norm, unembedding)."""
    return np.argsort(-lm.logit_lens(np.asarray(direction)[None])[0], kind="stable")[:n]


def sequence_perplexity(lm: LanguageModel, gen: Generation) -> np.ndarray:
    """[B] perplexity of each row's generated tokens given everything before them, under `lm` unsteered."""
    tokens, valid = np.asarray(gen.tokens), np.asarray(gen.valid)
    logp = lm.token_logprobs(tokens, valid).astype(np.float64)
    P = gen.prompt_columns
    out = np.full(len(tokens), np.nan)
    for b, n in enumerate(np.asarray(gen.n_generated)):
        if n:
            out[b] = float(np.exp(-logp[b, P:P + n].mean()))
    return out


@dataclasses.dataclass(frozen=True)
class SteeringEval:
    """Settings of `evaluate_steering`. layer: residual index steered (default: emojax.concepts.layer's choice,
    the fit's best layer); readout_layer: where the concept is read back (default: the next bank layer after
    it, else the last residual index)."""

    strengths: tuple[float, ...] = (-0.1, -0.05, 0.0, 0.05, 0.1)
    layer: int | None = None
    readout_layer: int | None = None
    n_congruent: int = 20
    max_new_tokens: int = 24
    positions: Positions = "all"
    unit: str = "norm"


def evaluate_steering(lm: LanguageModel, bank: ConceptBank, concepts: Sequence[str], prompts: Sequence[str],
                      settings: SteeringEval = SteeringEval(), decoder: Decoder | None = None) -> list[dict]:
    """One row per (concept, strength): logprob_shift, readout, perplexity (means over prompts), and a sample."""
    tokenizer = tokenizer_for(lm)
    tokens, mask = encode_prompts(tokenizer, prompts)
    decoder = decoder or Decoder(lm)
    L = lm.config.n_layers
    layer = bank_layer(bank, L, settings.layer)
    later = [i for i in bank.layers if i > layer]
    readout_layer = settings.readout_layer if settings.readout_layer is not None else (later[0] if later else L)
    strengths = np.asarray(settings.strengths, np.float32)
    if not (strengths == 0).any():
        strengths = np.concatenate([[0.0], strengths]).astype(np.float32)  # the baseline of the shifts
    n_p, n_s = len(prompts), len(strengths)
    rows = []
    for concept in concepts:
        direction = bank_direction(bank, concept, layer, "absolute")
        words = congruent_tokens(lm, direction, settings.n_congruent)
        if readout_layer in bank.layers:  # the one readout: the centred cosine with the bank's vector there
            readout, _ = readout_from_bank(bank, readout_layer, concepts=[concept])
        else:
            readout = Readout(concepts=np.asarray(direction, np.float32)[None], index=readout_layer)
        s_B = np.repeat(strengths, n_p)  # strength-major: row = s * n_p + p
        iv = from_bank(bank, L, [concept], s_B[:, None], layers=(layer,), positions=settings.positions,
                       unit=settings.unit)
        gen = decoder.generate(np.tile(tokens, (n_s, 1)), np.tile(mask, (n_s, 1)),
                               max_new_tokens=settings.max_new_tokens, interventions=iv, return_logits=True,
                               readout=readout)
        logp = _log_softmax(np.asarray(gen.logits)[:, 0])  # the first generated token: the steered prompt
        congruent = logp[:, words].mean(axis=1).reshape(n_s, n_p)
        baseline = congruent[int(np.nonzero(strengths == 0)[0][0])]
        valid = np.asarray(gen.valid).copy()
        valid[:, :gen.prompt_columns] = False
        reads = np.asarray(gen.readings)[..., 0]
        per_row = np.array([reads[b, valid[b]].mean() if valid[b].any() else np.nan for b in range(len(s_B))])
        ppl = sequence_perplexity(lm, gen)
        for i, s in enumerate(strengths):
            sample = gen.generated(i * n_p)
            rows.append({
                "concept": concept, "strength": float(s), "layer": int(layer), "readout_layer": int(readout_layer),
                "logprob_shift": float((congruent[i] - baseline).mean()),
                "readout": float(np.nanmean(per_row[i * n_p:(i + 1) * n_p])),
                "perplexity": float(np.nanmean(ppl[i * n_p:(i + 1) * n_p])),
                "congruent_tokens": [int(w) for w in words],
                "sample": tokenizer.decode(sample),
            })
    return rows


def steering_curves(rows: Sequence[dict], layer: int) -> dict:
    """evaluate_steering's rows as one curve per concept (strength -> readout, fluency perplexity, logprob
    shift), steered at `layer`, as the report plots them."""
    keys = {"strengths": "strength", "readout": "readout", "fluency_ppl": "perplexity",
            "logprob_shift": "logprob_shift"}  # curve key -> row key
    return {"layer": layer, "read_layer": rows[0]["readout_layer"] if rows else layer,
            "concepts": {c: {k: [r[v] for r in rows if r["concept"] == c] for k, v in keys.items()}
                         for c in dict.fromkeys(r["concept"] for r in rows)}}
