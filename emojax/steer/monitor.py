"""Concept monitoring: every token's reading of a bank's concepts (the fit's centred cosine), and threshold alerts.

`Readout` is the device side (computed inside the decode loop at one residual index, [B, T, C] per pass);
`Rule`, `find_alerts` and `AlertTracker` are the host side: "desperate > 0.3 for 3 tokens" raises an alert
with the row and the token positions (0 = the row's first prompt token) of the run; "desperate > 0.3 for 3 of
10 tokens" (a window) raises one when 3 of any 10 consecutive tokens are above. The tracker consumes readings
chunk by chunk as they stream from a long generation (`emojax monitor`, and `emojax serve` per request).
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
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


SEVERITIES = ("info", "warning", "critical")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Alert when `concept` stays above (or below) `threshold` for `min_tokens` consecutive tokens, or, with a
    `window` (>= min_tokens), for `min_tokens` of any `window` consecutive tokens. The threshold is in the
    readings' unit: z-units (standard deviations above neutral text) for a calibrated bank. `severity` (info,
    warning, critical) travels with the alerts it raises."""

    concept: str
    threshold: float
    min_tokens: int = 1
    above: bool = True
    window: int = 0  # 0: the min_tokens must be consecutive
    severity: str = "warning"

    _PATTERN = re.compile(r"^\s*([^<>\s]+)\s*([<>])\s*(-?[0-9.eE+-]+)\s*"
                          r"(?:(?::|for)\s*([0-9]+)\s*(?:(?:/|of)\s*([0-9]+)\s*)?(?:tokens?)?)?\s*"
                          r"(?:(" + "|".join(SEVERITIES) + r"))?\s*$")

    def __post_init__(self):
        if self.min_tokens < 1:
            raise InputError(f"rule {self}: the token count must be at least 1")
        if self.window and self.window < self.min_tokens:
            raise InputError(f"rule {self}: the window ({self.window} tokens) must hold at least the "
                             f"{self.min_tokens} tokens the rule counts")
        if self.severity not in SEVERITIES:
            raise InputError(f"rule {self}: severity {self.severity!r} is not one of {list(SEVERITIES)}")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """'desperate>0.3:3', 'desperate > 0.3 for 3 tokens', 'calm<-0.2', and with a window and a severity
        'desperate>2:3/10 critical' or 'desperate > 2 for 3 of 10 tokens critical' (3 of any 10 consecutive)."""
        m = cls._PATTERN.match(text)
        if not m:
            raise InputError(f"cannot read the rule {text!r}; write it like 'desperate>0.3:3' "
                             "(concept, > or <, threshold, and optionally :N consecutive tokens, :N/W for N of any "
                             f"W tokens, and a severity: {', '.join(SEVERITIES)})")
        try:
            threshold = float(m.group(3))
        except ValueError:
            raise InputError(f"rule {text!r}: {m.group(3)!r} is not a number") from None
        n = int(m.group(4)) if m.group(4) else 1
        if n < 1:
            raise InputError(f"rule {text!r}: the token count must be at least 1")
        window = int(m.group(5)) if m.group(5) else 0
        if window and window < n:
            raise InputError(f"rule {text!r}: the window ({window} tokens) must hold at least the {n} tokens the "
                             "rule counts")
        return cls(concept=m.group(1), threshold=threshold, min_tokens=n, above=m.group(2) == ">", window=window,
                   severity=m.group(6) or "warning")

    def __str__(self) -> str:
        count = f"{self.min_tokens} of {self.window}" if self.window else f"{self.min_tokens}"
        return f"{self.concept} {'>' if self.above else '<'} {self.threshold:g} for {count} tokens"


@dataclasses.dataclass(frozen=True)
class Alert:
    row: int
    rule: str
    concept: str
    start: int  # token position where the run began
    trigger: int  # position at which the run reached min_tokens (when the alert was raised)
    end: int  # last position of the run
    peak: float  # most extreme reading in the run
    severity: str = "warning"  # the rule's

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
        # (row, rule) -> [start, last, length, peak, alert index] for a run; see _window_step for a window
        self._runs: dict[tuple[int, int], list] = {}
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
                    step = self._window_step if rule.window else self._run_step
                    alert = step(b, r_i, rule, pos, value, hit)
                    if alert is not None:
                        raised.append(alert)
        return raised

    def _extreme(self, rule: Rule, a: float, b: float) -> float:
        return max(a, b) if rule.above else min(a, b)

    def _raise(self, b: int, rule: Rule, start: int, pos: int, peak: float) -> tuple[Alert, int]:
        alert = Alert(b, str(rule), rule.concept, start, pos, pos, peak, rule.severity)
        self._alerts.append(alert)
        return alert, len(self._alerts) - 1

    def _extend(self, index: int, pos: int, peak: float) -> None:
        self._alerts[index] = dataclasses.replace(self._alerts[index], end=pos, peak=peak)

    def _run_step(self, b: int, r_i: int, rule: Rule, pos: int, value: float, hit: bool) -> Alert | None:
        """Consecutive tokens: a run of hits raises once it is min_tokens long and grows until a miss."""
        run = self._runs.get((b, r_i))
        if not hit:
            self._runs.pop((b, r_i), None)
            return None
        if run is None:
            run = self._runs[(b, r_i)] = [pos, pos, 0, value, None]
        run[1], run[2] = pos, run[2] + 1
        run[3] = self._extreme(rule, run[3], value)
        if run[4] is None and run[2] >= rule.min_tokens:
            alert, run[4] = self._raise(b, rule, run[0], pos, run[3])
            return alert
        if run[4] is not None:
            self._extend(run[4], pos, run[3])
        return None

    def _window_step(self, b: int, r_i: int, rule: Rule, pos: int, value: float, hit: bool) -> Alert | None:
        """min_tokens hits among the last `window` tokens raise an alert (starting at the window's first hit); it
        grows with each further hit while the window keeps min_tokens hits, and ends when it holds fewer."""
        state = self._runs.get((b, r_i))
        if state is None:
            state = self._runs[(b, r_i)] = [deque(maxlen=rule.window), None, 0.0]  # recent hits, alert, peak
        recent = state[0]
        recent.append((pos, value) if hit else None)
        hits = [h for h in recent if h is not None]
        if state[1] is not None:
            if len(hits) < rule.min_tokens:
                state[1] = None
            elif hit:
                state[2] = self._extreme(rule, state[2], value)
                self._extend(state[1], pos, state[2])
            return None
        if not hit or len(hits) < rule.min_tokens:
            return None
        peak = hits[0][1]
        for _, v in hits[1:]:
            peak = self._extreme(rule, peak, v)
        alert, state[1] = self._raise(b, rule, hits[0][0], pos, peak)
        state[2] = peak
        return alert

    def alerts(self) -> list[Alert]:
        """Every alert so far, by row, then start position, then rule."""
        return sorted(self._alerts, key=lambda a: (a.row, a.start, a.rule))


def find_alerts(readings_BTC, positions_BT, rules: Sequence[Rule], names: Sequence[str]) -> list[Alert]:
    """Every alert of `rules` over whole readings [B, T, C] (positions [B, T]; < 0 = skip)."""
    tracker = AlertTracker(rules, names)
    tracker.feed(positions_BT, readings_BTC)
    return tracker.alerts()
