"""The study's remaining validations of a fitted bank, as the run's validate stage writes them:

    out/top_tokens.json   top-activating tokens on held-out text, per concept (emojax.concepts.top_tokens)
    out/templates.json    numeric templates: readout curves and their monotonicity (emojax.concepts.templates)

Both read at one layer (the run's: run.layer, else the fit's best layer), with the fit's readout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from emojax.concepts.bank import ConceptBank, check_model
from emojax.concepts.config import ValidateConfig
from emojax.concepts.templates import known_concepts, load_templates, template_curves
from emojax.concepts.top_tokens import store_tokenizer, top_activating_tokens
from emojax.fileio import write_json
from emojax.models.lm import LanguageModel, tokenizer_for
from emojax.store.reader import ActivationStore


def validate(config: ValidateConfig, store: ActivationStore, bank: ConceptBank, lm: LanguageModel, layer: int,
             out: str | Path, log: Callable[[str], None] | None = None, show_progress: bool = True) -> dict:
    """Writes top_tokens.json and templates.json to `out` (each atomically); returns their headline figures.
    `lm` is the model the store was dumped with and the bank fitted on (a bank of another model is refused)."""
    log = log or (lambda _msg: None)
    warning = check_model(bank, lm.identity, lm.source)
    if warning:
        log(f"validate: {warning}")
    out = Path(out)
    top = top_activating_tokens(store, bank, layer, config.split, config.percentile, config.examples,
                                config.context, store_tokenizer(store, lm.source), config.threshold_tokens,
                                config.n_boot, config.seed, config.chunk_rows, show_progress=show_progress)
    write_json(out / "top_tokens.json", top)
    templates = load_templates(config.templates or None, known_concepts(bank))
    curves = template_curves(lm, bank, templates, layer, tokenizer_for(lm), permutations=config.permutations,
                             seed=config.seed)
    write_json(out / "templates.json", curves)
    lift, signs = top["summary"], curves["summary"]
    log(f"validate: layer {layer}: mean lift of the top tokens {_figure(lift['mean_lift'])} (95% CI "
        f"{_figure(lift['mean_lift_ci95'])}, chance 1) over {lift['concepts']} concepts; template directions "
        f"{signs['agree']}/{signs['expected']} as expected (chance 50%)")
    return {"layer": int(layer), "mean_lift": lift["mean_lift"], "mean_lift_ci95": lift["mean_lift_ci95"],
            "concepts_above_chance": lift["above_chance"], "templates": len(templates),
            "directions_expected": signs["expected"], "directions_agree": signs["agree"],
            "monotone_rate": signs["monotone_rate"]}


def _figure(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "-".join(f"{v:.2f}" for v in value)
    return f"{value:.2f}"
