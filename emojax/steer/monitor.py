"""Concept monitoring: every token's reading of a bank's concepts (the fit's centred cosine), and threshold alerts.

`Readout` is the device side (computed inside the decode loop at one residual index, [B, T, C] per pass);
`Rule`, `find_alerts` and `AlertTracker` are the host side: "desperate > 0.3 for 3 tokens" raises an alert
with the row and the token positions (0 = the row's first prompt token) of the run. The tracker consumes
readings chunk by chunk as they stream from a long generation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import struct

from emojax.concepts.bank import ConceptBank
from emojax.concepts.evaluate import Metric, concept_readout
from emojax.errors import InputError

METRICS = ("z", "cosine", "dot")  # what a monitor reads: z-scores against neutral text, or the raw readout


@struct.dataclass
class Readout:
    """Readings [B, T, C] of `concepts` [C, D] in the residual at `index` (after any intervention there),
    measured from `center` [D] (None: the origin): the fit evaluation's readout (concept_readout), cos(x - c, v)
    for metric "cosine", (x - c) . v for "dot". Index L reads after the final norm, like capture=(L,).
    With `offset` and `scale` [C] (a bank's neutral calibration) the readings are z-scores, (r - offset) / scale:
    how many standard deviations of neutral text a reading lies above neutral text's mean.
    Concepts, center and index are arrays: monitoring other concepts or another layer does not recompile.
    """

    concepts: jax.Array
    index: jax.Array | int = 0
    center: jax.Array | None = None
    metric: Metric = struct.field(pytree_node=False, default="cosine")
    offset: jax.Array | None = None
    scale: jax.Array | None = None

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        readings = concept_readout(x_BTD, self.concepts, self.center, self.metric)
        return readings if self.offset is None else (readings - self.offset) / self.scale


def monitor_metric(bank: ConceptBank, layer: int, metric: str | None = None) -> str:
    """The unit readings are in: `metric` when given, else "z" for a bank calibrated on neutral text at `layer`
    (emojax fit measures it), else "cosine"."""
    if metric is None:
        return "z" if bank.calibration(layer) is not None else "cosine"
    if metric not in METRICS:
        raise InputError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if metric == "z" and bank.calibration(layer) is None:
        raise InputError(f"{bank.source or 'the bank'} has no neutral calibration at layer {layer} (fitted without "
                         "neutral documents, or by an older emojax): refit it with `emojax fit`, or read cosines "
                         "(--metric cosine)")
    return metric


def readout_from_bank(bank: ConceptBank, layer: int, metric: str | None = "cosine",
                      concepts: Sequence[str] | None = None) -> tuple[Readout, tuple[str, ...]]:
    """A Readout of the bank's concepts (all, or `concepts`) at residual index `layer`, measured from the bank's
    center there (the origin for a bank without one), and their names. metric "z" (the default None picks it for
    a calibrated bank, see monitor_metric): the centred cosine as a z-score against the bank's neutral readings."""
    metric = monitor_metric(bank, layer, metric)
    names = tuple(concepts) if concepts else bank.names
    at = bank.at_layer(layer)
    idx = [bank.concept_index(n) for n in names]
    center = np.zeros(bank.d_model, np.float32) if bank.center is None else bank.center[bank.layer_index(layer)]
    readout = Readout(concepts=at[idx].astype(np.float32), index=np.int32(layer), center=center.astype(np.float32),
                      metric="dot" if metric == "dot" else "cosine")
    if metric == "z":
        mean, std = bank.calibration(layer)
        readout = readout.replace(offset=mean[idx].astype(np.float32), scale=std[idx].astype(np.float32))
    return readout, names


@dataclasses.dataclass(frozen=True)
class Rule:
    """Alert when `concept` stays above (or below) `threshold` for `min_tokens` consecutive tokens. The threshold
    is in the readings' unit: z-units (standard deviations above neutral text) for a calibrated bank."""

    concept: str
    threshold: float
    min_tokens: int = 1
    above: bool = True

    _PATTERN = re.compile(r"^\s*([^<>\s]+)\s*([<>])\s*(-?[0-9.eE+-]+)\s*(?:(?::|for)\s*([0-9]+)\s*(?:tokens?)?)?\s*$")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """'desperate>0.3:3', 'desperate > 0.3 for 3 tokens' or 'calm<-0.2'."""
        m = cls._PATTERN.match(text)
        if not m:
            raise InputError(f"cannot read the rule {text!r}; write it like 'desperate>0.3:3' "
                             "(concept, > or <, threshold, and optionally :N consecutive tokens)")
        try:
            threshold = float(m.group(3))
        except ValueError:
            raise InputError(f"rule {text!r}: {m.group(3)!r} is not a number") from None
        n = int(m.group(4)) if m.group(4) else 1
        if n < 1:
            raise InputError(f"rule {text!r}: the token count must be at least 1")
        return cls(concept=m.group(1), threshold=threshold, min_tokens=n, above=m.group(2) == ">")

    def __str__(self) -> str:
        return f"{self.concept} {'>' if self.above else '<'} {self.threshold:g} for {self.min_tokens} tokens"


@dataclasses.dataclass(frozen=True)
class Alert:
    row: int
    rule: str
    concept: str
    start: int  # token position where the run began
    trigger: int  # position at which the run reached min_tokens (when the alert was raised)
    end: int  # last position of the run
    peak: float  # most extreme reading in the run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class AlertTracker:
    """Applies rules to readings arriving in position order, chunk by chunk (per row).

        tracker = AlertTracker(rules, names)
        new = tracker.feed(positions_Bn, readings_BnC)   # alerts raised in this chunk
        tracker.alerts()                                 # every alert with its full run
    Positions < 0 mark padding or unused columns and are skipped (they neither extend nor break a run).
    """

    def __init__(self, rules: Sequence[Rule], names: Sequence[str]):
        self.rules = tuple(rules)
        self.names = tuple(names)
        for r in self.rules:
            if r.concept not in self.names:
                raise InputError(f"rule {r}: concept {r.concept!r} is not monitored (concepts: "
                                 f"{', '.join(self.names)})")
        self._columns = [self.names.index(r.concept) for r in self.rules]
        self._runs: dict[tuple[int, int], list] = {}  # (row, rule) -> [start, last, length, peak, alert index]
        self._alerts: list[Alert] = []

    def feed(self, positions, readings) -> list[Alert]:
        positions = np.asarray(positions)
        readings = np.asarray(readings, np.float32)
        raised = []
        for b in range(positions.shape[0]):
            for t in range(positions.shape[1]):
                pos = int(positions[b, t])
                if pos < 0:
                    continue
                for r_i, (rule, c) in enumerate(zip(self.rules, self._columns)):
                    value = float(readings[b, t, c])
                    hit = value > rule.threshold if rule.above else value < rule.threshold
                    run = self._runs.get((b, r_i))
                    if not hit:
                        self._runs.pop((b, r_i), None)
                        continue
                    if run is None:
                        run = self._runs[(b, r_i)] = [pos, pos, 0, value, None]
                    run[1], run[2] = pos, run[2] + 1
                    run[3] = max(run[3], value) if rule.above else min(run[3], value)
                    if run[4] is None and run[2] >= rule.min_tokens:
                        run[4] = len(self._alerts)
                        alert = Alert(b, str(rule), rule.concept, run[0], pos, pos, run[3])
                        self._alerts.append(alert)
                        raised.append(alert)
                    elif run[4] is not None:
                        self._alerts[run[4]] = dataclasses.replace(self._alerts[run[4]], end=pos, peak=run[3])
        return raised

    def alerts(self) -> list[Alert]:
        """Every alert so far, by row, then start position, then rule."""
        return sorted(self._alerts, key=lambda a: (a.row, a.start, a.rule))


def find_alerts(readings_BTC, positions_BT, rules: Sequence[Rule], names: Sequence[str]) -> list[Alert]:
    """Every alert of `rules` over whole readings [B, T, C] (positions [B, T]; < 0 = skip)."""
    tracker = AlertTracker(rules, names)
    tracker.feed(positions_BT, readings_BTC)
    return tracker.alerts()
