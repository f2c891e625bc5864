"""Situations -> appraisal -> emotion: the world's known P(emotion | situation).

A situation is one level of each part in PARTS (data/situations.yaml): what happens (event), whom it concerns
(target), who the other person is (relation), how much hangs on it (stakes), who caused it (cause), whether it
can still change (outlook), how expected it was (pace) and the character's bodily state (body). Its appraisal
vector a [K] (K = the coordinate dimensions) is the sum of the levels' contributions, the event's valence scaled by
the stakes' gain and, when the event concerns the other person, by their closeness; clipped to [-1, 1].

The world draws an emotion e uniformly, then a situation s with probability proportional to

    P_app(e | s) = softmax_e( -sum_k w_k (a_k(s) - c_ek)^2 / T )          (c_e: the emotion's coordinates)

over the situations of one split, so every emotion is equally common and each comes from the situations that
appraise like it. The posterior a reader can reach from the situation alone is then

    P(e | s) = P_app(e | s) / Z_e  normalised over e,   Z_e = sum over the split's situations of P_app(e | s).

Splits: every combination of part levels belongs to exactly one of train / val / test / implicit (a seeded
permutation), so a held-out situation is a new combination of known parts, never new words.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from importlib import resources

import numpy as np
import yaml

from emojax.world.coordinates import DIMS, load_coordinates

PARTS = ("event", "target", "relation", "stakes", "cause", "outlook", "pace", "body")
SPLITS = ("train", "val", "test", "implicit")
# Distance weights per coordinate dimension: valence counts most, the rarer appraisals a little less.
WEIGHTS = {"valence": 2.0, "arousal": 1.0, "control": 1.0, "certainty": 0.8, "social": 1.0, "agency": 1.0,
           "time": 0.8, "novelty": 0.8, "energy": 0.8}


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of one part: its appraisal contribution [K] and its text (phrasings by role)."""

    part: str
    name: str
    index: int
    appraisal_K: np.ndarray
    text: dict[str, tuple[str, ...]]
    gain: float = 1.0  # stakes: multiplies the event's valence
    closeness: float = 1.0  # relation: multiplies the event's valence when the event concerns the other person


@functools.cache
def load_parts() -> dict[str, tuple[Level, ...]]:
    """part -> its levels, from data/situations.yaml (cached). Raises on an unknown dimension or part."""
    raw = yaml.safe_load(resources.files("emojax.world").joinpath("data", "situations.yaml").read_text("utf-8"))
    if set(raw) != set(PARTS):
        raise AssertionError(f"situations.yaml parts {sorted(raw)} != {sorted(PARTS)}")
    parts = {}
    for part in PARTS:
        levels = []
        for i, row in enumerate(raw[part]):
            unknown = set(row.get("appraisal", {})) - set(DIMS)
            if unknown:
                raise AssertionError(f"situations.yaml {part}/{row['name']}: unknown dimensions {sorted(unknown)}")
            vec = np.array([float(row.get("appraisal", {}).get(d, 0.0)) for d in DIMS])
            text = {k: tuple(v) for k, v in row.items() if k in ("self", "other", "intro", "text", "short")}
            levels.append(Level(part=part, name=row["name"], index=i, appraisal_K=vec, text=text,
                                gain=float(row.get("gain", 1.0)), closeness=float(row.get("closeness", 1.0))))
        parts[part] = tuple(levels)
    return parts


def part_sizes() -> tuple[int, ...]:
    parts = load_parts()
    return tuple(len(parts[p]) for p in PARTS)


@dataclasses.dataclass(frozen=True)
class Situation:
    """One combination of part levels (`levels[i]` indexes PARTS[i]'s levels) and its flat index."""

    index: int
    levels: tuple[int, ...]

    def level(self, part: str) -> Level:
        return load_parts()[part][self.levels[PARTS.index(part)]]

    @property
    def key(self) -> str:
        """Readable id: the level names in PARTS order, e.g. 'loss/self/friend/grave/other/final/sudden/drained'."""
        return "/".join(self.level(p).name for p in PARTS)


def situation(index: int) -> Situation:
    return Situation(index=int(index), levels=tuple(int(x) for x in np.unravel_index(int(index), part_sizes())))


def appraisal_grid() -> np.ndarray:
    """[N, K] the appraisal vector of every situation, N = product of the part sizes, in flat-index order."""
    parts = load_parts()
    sizes = part_sizes()
    grids = np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij")
    lv = {p: g.reshape(-1) for p, g in zip(PARTS, grids)}
    table = {p: np.stack([lvl.appraisal_K for lvl in parts[p]]) for p in PARTS}
    total_NK = sum(table[p][lv[p]] for p in PARTS)
    v = DIMS.index("valence")
    gain = np.array([lvl.gain for lvl in parts["stakes"]])[lv["stakes"]]
    closeness = np.array([lvl.closeness for lvl in parts["relation"]])[lv["relation"]]
    concerns_other = np.array([lvl.name == "other" for lvl in parts["target"]])[lv["target"]]
    event_v = table["event"][lv["event"], v]
    scaled = event_v * gain * np.where(concerns_other, closeness, 1.0)
    total_NK[:, v] += scaled - event_v
    return np.clip(total_NK, -1.0, 1.0)


def log_p_app(appraisal_NK: np.ndarray, c_CK: np.ndarray, temperature: float) -> np.ndarray:
    """[N, C] float32: log P_app(e | s), the softmax over the C emotions (coordinates c_CK) of -weighted squared
    distance / temperature."""
    w_K = np.array([WEIGHTS[d] for d in DIMS])
    # |a - c|^2_w = |a|^2_w - 2 a.w.c + |c|^2_w, accumulated in place (the [N, C] array is the only big one)
    logits_NC = ((appraisal_NK * w_K) @ c_CK.T).astype(np.float32)
    logits_NC *= 2.0
    logits_NC -= ((appraisal_NK ** 2) @ w_K).astype(np.float32)[:, None]
    logits_NC -= ((c_CK ** 2) @ w_K).astype(np.float32)[None, :]
    logits_NC /= temperature
    logits_NC -= _logsumexp(logits_NC, axis=1)[:, None]
    return logits_NC


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (np.log(np.exp(x - top).sum(axis=axis, keepdims=True)) + top).squeeze(axis)


def split_of_situations(n: int, seed: int, fractions: dict[str, float]) -> np.ndarray:
    """[N] int8 split id (index into SPLITS) of every situation: a seeded permutation cut at the fractions of
    val, test and implicit; the rest is train."""
    digest = hashlib.sha256(repr((seed, "world-split")).encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:16], "little")).permutation(n)
    out = np.zeros(n, np.int8)
    start = 0
    for name in ("val", "test", "implicit"):
        count = int(round(fractions[name] * n))
        out[order[start:start + count]] = SPLITS.index(name)
        start += count
    return out


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: its methods are cached
class AppraisalModel:
    """The world's situation -> emotion model for one temperature and split seed.

    log_p_NC [N, C]: log P_app(e | s). split_N [N]: split id per situation. log_z_SC [4, C]: log Z_e per split."""

    temperature: float
    log_p_NC: np.ndarray
    split_N: np.ndarray
    log_z_SC: np.ndarray
    appraisal_NK: np.ndarray

    def indices(self, split: str) -> np.ndarray:
        """[N_split] the flat indices of the situations in `split`."""
        return np.flatnonzero(self.split_N == SPLITS.index(split))

    @functools.lru_cache(maxsize=4 * 171)  # noqa: B019 - the model lives as long as the program's World
    def situation_distribution(self, emotion: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(indices [M], log-probabilities [M]) of P(s | e) over the split's situations (M = its size)."""
        idx = self.indices(split)
        logp = self.log_p_NC[idx, emotion].astype(np.float64)
        return idx, logp - _logsumexp(logp, axis=0)

    def posterior(self, index: int, split: str) -> np.ndarray:
        """[C] P(e | s) for situation `index` drawn within `split` (uniform prior over emotions)."""
        logits = self.log_p_NC[index].astype(np.float64) - self.log_z_SC[SPLITS.index(split)]
        return np.exp(logits - _logsumexp(logits, axis=0))

    def posteriors(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(indices [M], P(e | s) [M, C]) for every situation of `split`."""
        idx = self.indices(split)
        logits = self.log_p_NC[idx].astype(np.float64) - self.log_z_SC[SPLITS.index(split)]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return idx, p / p.sum(axis=1, keepdims=True)


@functools.cache
def appraisal_model(temperature: float, split_seed: int, val: float, test: float, implicit: float,
                    concepts: tuple[str, ...] | None = None) -> AppraisalModel:
    """Built once per setting (cached): 72,900 situations x the emotions `concepts` (names; None: all 171, in the
    catalogue's order), a second or two on one core. Which situations are held out does not depend on `concepts`."""
    appraisal_NK = appraisal_grid()
    coords = load_coordinates()
    c_CK = coords.values_CK if concepts is None else coords.values_CK[[coords.index(n) for n in concepts]]
    log_p_NC = log_p_app(appraisal_NK, c_CK, temperature)
    split_N = split_of_situations(len(log_p_NC), split_seed, {"val": val, "test": test, "implicit": implicit})
    log_z_SC = np.stack([_logsumexp(log_p_NC[split_N == s].astype(np.float64), axis=0)
                         if np.any(split_N == s) else np.full(log_p_NC.shape[1], -np.inf)
                         for s in range(len(SPLITS))])
    return AppraisalModel(temperature=temperature, log_p_NC=log_p_NC, split_N=split_N, log_z_SC=log_z_SC,
                          appraisal_NK=appraisal_NK)
