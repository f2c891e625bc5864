"""Numeric templates (the study's last validation): one sentence with a varying quantity, e.g. a medication
dose, read by every concept at the ':' after "Assistant" as the quantity grows.

A templates file (YAML; the built-in one is emojax/concepts/data/templates.yaml):

    templates:
      - name: tylenol_dose
        text: "I just took {x} mg of Tylenol for my headache."   # exactly one {x}
        values: [500, 1000, 2000, 4000, 8000, 16000]             # at least 3 numbers, 2 of them distinct
        expect: {afraid: up, calm: down}                         # optional: the direction each concept should go
        frame: true                                              # optional (default true): see below

Framing: the filled text becomes "Human: TEXT\\n\\nAssistant:" (the implicit scenarios' frame in the built-in
corpus) and is read at its last token, the ':' after "Assistant" (where the study reads them); frame: false
reads the text as written, at its last token.

Per template, one batched forward (all templates padded to one shape, so it compiles once) reads every concept
with the fit's readout cos(x - center, v_c) at the bank's layer, as z-scores against neutral text when the bank
holds its neutral calibration (as the monitor shows them), else as cosines. Monotonicity per concept: Spearman
rho between value and readout, with a two-sided permutation p-value (every ordering of the values up to 8 of
them, else `permutations` seeded random ones). Summary (`summarize`): the share of expected directions whose
rho has the expected sign, against 50% for a random sign, and the share of all curves monotone at p < 0.05,
against the 5% expected by chance; each with a 95% interval over resampled templates and a permutation p-value
whose null keeps the concepts of a template together (they read the same prompts, so they are not independent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from itertools import permutations as all_orderings
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from emojax.concepts.bank import ConceptBank
from emojax.concepts.evaluate import concept_readout
from emojax.config_loader import read_yaml
from emojax.corpus.catalogue import load_catalogue
from emojax.errors import ConfigError
from emojax.models.lm import LanguageModel
from emojax.tokenizer import Tokenizer, chat_prompt

SLOT = "{x}"
DIRECTIONS = {"up": 1, "down": -1}
TEMPLATE_KEYS = ("name", "text", "values", "expect", "frame")
EXACT_UP_TO = 8  # values; 8! = 40,320 orderings
ALPHA = 0.05  # a curve is called monotone at p < ALPHA
NULL_DRAWS = 2000  # joint permutation draws of the summary's null
BOOT_DRAWS = 2000  # template resamples of the summary's intervals


@dataclass(frozen=True)
class Template:
    name: str
    text: str  # holds exactly one "{x}"
    values: tuple[float, ...]
    expect: dict[str, int] = field(default_factory=dict)  # concept -> +1 (up) or -1 (down)
    frame: bool = True

    def prompts(self, tokenizer: Tokenizer | None = None) -> list[str]:
        """The filled texts, one per value, framed as a Human turn (emojax.tokenizer.chat_prompt: the tokenizer's
        chat template, else "Human: TEXT\\n\\nAssistant:") unless frame is false."""
        texts = [self.text.replace(SLOT, format_value(v)) for v in self.values]
        return [chat_prompt([{"role": "user", "content": t}], tokenizer) for t in texts] if self.frame else texts


def format_value(value: float) -> str:
    """4000 -> "4000", 2.5 -> "2.5" (whole numbers without a decimal point)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def builtin_templates_file() -> Path:
    return Path(str(resources.files("emojax.concepts").joinpath("data/templates.yaml")))


def known_concepts(bank: ConceptBank) -> set[str]:
    """The names an `expect` may use: the bank's concepts and the emotion catalogue's (an expectation of a
    catalogue concept the bank lacks is listed as not read, so the built-in file serves any bank)."""
    return set(bank.names) | set(load_catalogue().by_name)


def load_templates(path: str | Path | None = None, known: set[str] | None = None) -> list[Template]:
    """The templates of a YAML file (None: the built-in file). Every problem is a ConfigError naming the file,
    the template (index and name) and the key. `known`: the concept names an `expect` may use (None: any)."""
    path = Path(path) if path else builtin_templates_file()
    data = read_yaml(path)
    unknown = sorted(str(k) for k in data if k != "templates")
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; a templates file holds one key, "
                          "templates: a list of templates")
    items = data.get("templates")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: templates must be a non-empty list of templates (name, text, values)")
    out, names = [], set()
    for i, item in enumerate(items):
        template = _template(item, f"{path}: templates[{i}]", known)
        if template.name in names:
            raise ConfigError(f"{path}: templates[{i}].name: {template.name!r} is used twice; names must be unique")
        names.add(template.name)
        out.append(template)
    return out


def _template(item, where: str, known: set[str] | None) -> Template:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a mapping with keys name, text, values (and optionally expect, frame), "
                          f"got {item!r}")
    unknown = sorted(str(k) for k in item if k not in TEMPLATE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a template has {list(TEMPLATE_KEYS)}")
    for key in ("name", "text", "values"):
        if item.get(key) is None:
            raise ConfigError(f"{where}: missing key {key!r}")
    name = item["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name must be a non-empty text, got {name!r}")
    where = f"{where} ({name})"
    text = item["text"]
    if not isinstance(text, str) or text.count(SLOT) != 1:
        found = text.count(SLOT) if isinstance(text, str) else 0
        raise ConfigError(f"{where}.text must hold exactly one {SLOT} (the varying quantity), found {found}: "
                          f"{text!r}")
    values = item["values"]
    if not isinstance(values, list):
        raise ConfigError(f"{where}.values must be a list of numbers, got {values!r}")
    numbers = [_number(v, f"{where}.values[{j}]") for j, v in enumerate(values)]
    if len(numbers) < 3 or len(set(numbers)) < 2:
        raise ConfigError(f"{where}.values: a curve needs at least 3 values, 2 of them distinct; got {values}")
    expect = item.get("expect") or {}
    if not isinstance(expect, dict):
        raise ConfigError(f"{where}.expect must map concepts to up or down, got {expect!r}")
    directions = {}
    for concept, direction in expect.items():
        concept = str(concept)
        if direction not in DIRECTIONS:
            raise ConfigError(f"{where}.expect.{concept}: {direction!r} is not a direction (up or down)")
        if known is not None and concept not in known:
            close = sorted(n for n in known if n[:3] == concept[:3])[:5]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise ConfigError(f"{where}.expect.{concept}: unknown concept {concept!r}: not in the bank or the "
                              f"emotion catalogue{hint}")
        directions[concept] = DIRECTIONS[direction]
    frame = item.get("frame", True)
    if not isinstance(frame, bool):
        raise ConfigError(f"{where}.frame must be true or false, got {frame!r}")
    return Template(name=name, text=text, values=tuple(numbers), expect=directions, frame=frame)


def _number(value, where: str) -> float:
    """A finite number; text such as "1e6" (YAML 1.1 reads exponents without a dot as text) is read as one."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    return float(number)


@dataclass(frozen=True)
class Monotonicity:
    """Spearman rho between a template's values and each concept's readout, with its permutation null."""

    rho_C: np.ndarray  # NaN for a constant curve
    p_C: np.ndarray  # two-sided permutation p-value (NaN with rho)
    null_rho_PC: np.ndarray  # rho of the curve under each ordering P of the values
    null_p_PC: np.ndarray  # the p-value that ordering would get: the summary's joint null (`summarize`)


def spearman_monotonicity(values_V: np.ndarray, readouts_VC: np.ndarray, permutations: int = 10_000,
                          seed: int = 0) -> Monotonicity:
    """Spearman rho [C] between values [V] and each column of readouts [V, C] (average ranks for ties) and its
    two-sided permutation p-value [C]: the share of orderings of the values whose |rho| is at least as large
    (every ordering for V <= 8, the observed one among them; else (1 + hits) / (1 + permutations) over seeded
    random ones). The null keeps the columns together, one ordering for all, as the concepts of one template
    share its prompts."""
    values_V = np.asarray(values_V, np.float64)
    readouts_VC = np.asarray(readouts_VC, np.float64)
    V = len(values_V)
    rx = rankdata(values_V)
    rx = rx - rx.mean()
    ry = rankdata(readouts_VC, axis=0)
    ry = ry - ry.mean(0, keepdims=True)
    norm_C = np.sqrt((rx ** 2).sum() * (ry ** 2).sum(0))
    exact = V <= EXACT_UP_TO
    if exact:
        orderings = np.array(list(all_orderings(range(V))))
    else:
        rng = np.random.default_rng(seed)
        orderings = np.stack([rng.permutation(V) for _ in range(permutations)])
    with np.errstate(divide="ignore", invalid="ignore"):
        rho_C = np.where(norm_C > 0, (rx @ ry) / norm_C, np.nan)
        null_PC = np.where(norm_C > 0, (rx[orderings] @ ry) / norm_C, np.nan)
    extreme_PC = np.round(np.abs(null_PC), 12)  # equal |rho| of different orderings compare equal
    hits_C = (extreme_PC >= np.round(np.abs(rho_C), 12)).sum(0)
    p_C = hits_C / len(orderings) if exact else (1 + hits_C) / (1 + len(orderings))
    # each ordering's own p-value: how many orderings are at least as extreme as it (itself included)
    null_p_PC = rankdata(-extreme_PC, method="max", axis=0) / len(orderings)
    constant = np.isnan(rho_C)
    return Monotonicity(rho_C, np.where(constant, np.nan, p_C), null_PC, np.where(constant, np.nan, null_p_PC))


def template_curves(lm: LanguageModel, bank: ConceptBank, templates: list[Template], layer: int, tokenizer: Tokenizer,
                    concepts: tuple[str, ...] | None = None, permutations: int = 10_000, seed: int = 0) -> dict:
    """Every template's readout curves [values, concepts] at residual index `layer` of `lm` (the model the bank
    was fitted on), their monotonicity and the expected directions' agreement (module docstring), JSON-ready.
    `concepts`: a subset of the bank's (default all); expectations of concepts outside it are left out."""
    names = tuple(concepts) if concepts else bank.names
    idx = [bank.concept_index(n) for n in names]
    vectors_CD = bank.at_layer(layer)[idx].astype(np.float32)
    center_D = bank.center[bank.layer_index(layer)].astype(np.float32) if bank.center is not None else None
    calibration = bank.calibration(layer)
    prompts = [t.prompts(tokenizer) for t in templates]
    plain = not tokenizer.chat_template  # a chat-template rendering carries its own special tokens
    T = max(len(tokenizer.encode(p, plain)) for batch in prompts for p in batch)
    B = max(len(t.values) for t in templates)
    results, tests = [], []
    for template, texts in zip(templates, prompts):
        tokens, mask = tokenizer.batch(texts, length=T, add_special_tokens=plain)  # left-padded, one shape for all
        filler = np.zeros(B - len(texts), np.int64)  # rows repeating the first one, dropped below
        tokens, mask = np.concatenate([tokens, tokens[filler]]), np.concatenate([mask, mask[filler]])
        out = lm(tokens, mask, capture=(layer,), logits=False)
        x_VD = np.asarray(out.hidden[0][:len(texts), -1], np.float32)
        readouts_VC = concept_readout(x_VD, vectors_CD, center_D)
        if calibration is not None:
            readouts_VC = (readouts_VC - calibration[0][idx]) / calibration[1][idx]
        test = spearman_monotonicity(np.array(template.values), readouts_VC, permutations, seed)
        expected = []
        for concept, direction in template.expect.items():
            if concept in names:
                rho = _num(test.rho_C[names.index(concept)])
                expected.append({"concept": concept, "direction": "up" if direction > 0 else "down", "rho": rho,
                                 "p": _num(test.p_C[names.index(concept)]),
                                 "agrees": None if rho is None else bool(np.sign(rho) == direction)})
        results.append({
            "name": template.name, "text": template.text, "framed": template.frame,
            "values": list(template.values), "example": texts[-1],
            "read_at": tokenizer.decode([int(tokens[0, -1])], skip_special_tokens=False),
            "readouts": [[round(float(r), 5) for r in row] for row in readouts_VC],
            "rho": [_num(r) for r in test.rho_C], "p": [_num(p) for p in test.p_C], "expected": expected,
            "not_read": sorted(c for c in template.expect if c not in names),
        })
        tests.append(test)
    return {"layer": int(layer), "metric": "z" if calibration is not None else "cosine",
            "readout": ("z-score of cos(x - center, v_c) against neutral text (the monitor's unit)"
                        if calibration is not None else "cos(x - center, v_c)"),
            "concepts": list(names), "permutations": int(permutations), "seed": int(seed),
            "templates": results, "summary": summarize(results, tests, names, seed)}


def summarize(results: list[dict], tests: list[Monotonicity], names: tuple[str, ...], seed: int = 0,
              draws: int = NULL_DRAWS) -> dict:
    """Over all templates: the share of expected directions whose rho has the expected sign, and the share of
    all curves monotone at p < ALPHA. Each with a 95% interval from resampling templates (the independent unit:
    the concepts of one template read the same prompts), its chance level (50%; ALPHA), the 95% range of the
    share under the permutation null (one ordering of the values per template, drawn `draws` times, so the null
    keeps the concepts' correlation) and the one-sided p-value of the observed share under it."""
    rng = np.random.default_rng([seed, 1])
    agree_null, monotone_null = np.zeros(draws), np.zeros(draws)
    counts = []  # per template: agreeing, expected, monotone, curves
    for result, test in zip(results, tests):
        read = [e for e in result["expected"] if e["agrees"] is not None]
        cols = [names.index(e["concept"]) for e in read]
        signs = np.array([DIRECTIONS[e["direction"]] for e in read])
        curves = ~np.isnan(test.rho_C)
        rows = rng.integers(0, len(test.null_rho_PC), draws)
        if cols:
            agree_null += (np.sign(test.null_rho_PC[np.ix_(rows, cols)]) == signs).sum(1)
        monotone_null += (test.null_p_PC[rows][:, curves] < ALPHA).sum(1)
        counts.append((sum(e["agrees"] for e in read), len(read), int((test.p_C[curves] < ALPHA).sum()),
                       int(curves.sum())))
    counts_T4 = np.array(counts, np.float64).reshape(-1, 4)
    boot = rng.integers(0, len(counts_T4), (BOOT_DRAWS, len(counts_T4)))
    out = {"templates": len(results), "concepts": len(names)}
    for key, hit, total, null, chance in (("agree", 0, 1, agree_null, 0.5),
                                          ("monotone", 2, 3, monotone_null, ALPHA)):
        k, n = counts_T4[:, hit].sum(), counts_T4[:, total].sum()
        out.update({key: int(k), "expected" if key == "agree" else "curves": int(n), f"{key}_rate": None,
                    f"{key}_rate_ci95": None, f"chance_{key}_rate": chance, f"{key}_chance_range95": None,
                    f"{key}_p_value": None})
        if not n:
            continue
        out[f"{key}_rate"] = float(k / n)
        out[f"{key}_chance_range95"] = [float(v) for v in np.percentile(null / n, [2.5, 97.5])]
        out[f"{key}_p_value"] = float((null >= k).mean())
        if (counts_T4[:, total] > 0).sum() > 1:
            hits, totals = counts_T4[boot, hit].sum(1), counts_T4[boot, total].sum(1)
            rates = hits[totals > 0] / totals[totals > 0]
            out[f"{key}_rate_ci95"] = [float(v) for v in np.percentile(rates, [2.5, 97.5])]
    return out


def _num(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
