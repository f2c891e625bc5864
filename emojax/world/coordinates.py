"""Graded coordinates of the 171 emotion concepts: the place of each emotion in the world's appraisal space.

data/coordinates.csv holds one row per concept in the study's order (shared/emotions.txt, the catalogue's order),
every value in [-1, 1]. They are emojax's own annotation (see the file's header), not a published norm.

    coords = load_coordinates()
    coords.values_CK[coords.index("desperate")]      # [K] floats, K = len(DIMS)
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources

import numpy as np

from emojax.corpus.catalogue import load_catalogue

DIMS = ("valence", "arousal", "control", "certainty", "social", "agency", "time", "novelty", "energy")


@dataclasses.dataclass(frozen=True)
class Coordinates:
    """names [C] in the catalogue's order; values_CK [C, K] float64 in [-1, 1], columns in DIMS order."""

    names: tuple[str, ...]
    values_CK: np.ndarray

    @functools.cached_property
    def _position(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def index(self, name: str) -> int:
        return self._position[name]

    def of(self, name: str) -> dict[str, float]:
        """One concept's coordinates by dimension name."""
        row = self.values_CK[self.index(name)]
        return {d: float(v) for d, v in zip(DIMS, row)}

    def column(self, dim: str) -> np.ndarray:
        """[C] one dimension over every concept."""
        return self.values_CK[:, DIMS.index(dim)]


def parse_coordinates(text: str, source: str = "coordinates.csv") -> Coordinates:
    """Rows `name,<one value per DIMS>` after a header row; '#' lines are comments. Raises ValueError naming the
    row for a wrong header, a missing or extra value, a value outside [-1, 1], or a repeated name."""
    rows = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not rows or rows[0].split(",") != ["name", *DIMS]:
        raise ValueError(f"{source}: the header must be name,{','.join(DIMS)}")
    names, values = [], []
    for lineno, line in enumerate(rows[1:], start=2):
        cells = line.split(",")
        if len(cells) != len(DIMS) + 1:
            raise ValueError(f"{source}: data row {lineno}: {len(cells)} cells, expected {len(DIMS) + 1}")
        name = cells[0].strip()
        if name in names:
            raise ValueError(f"{source}: data row {lineno}: {name!r} appears twice")
        try:
            row = [float(c) for c in cells[1:]]
        except ValueError:
            raise ValueError(f"{source}: data row {lineno} ({name}): a value is not a number") from None
        bad = [f"{d}={v}" for d, v in zip(DIMS, row) if not -1.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"{source}: data row {lineno} ({name}): outside [-1, 1]: {', '.join(bad)}")
        names.append(name)
        values.append(row)
    return Coordinates(names=tuple(names), values_CK=np.asarray(values, np.float64))


@functools.cache
def load_coordinates() -> Coordinates:
    """The packaged table (cached). It must list exactly the catalogue's concepts in the catalogue's order."""
    text = resources.files("emojax.world").joinpath("data", "coordinates.csv").read_text(encoding="utf-8")
    coords = parse_coordinates(text)
    expected = tuple(load_catalogue().names_list)
    if coords.names != expected:
        missing = sorted(set(expected) - set(coords.names))
        extra = sorted(set(coords.names) - set(expected))
        raise AssertionError(f"coordinates.csv does not list the catalogue's 171 concepts in order "
                             f"(missing {missing}, extra {extra})")
    return coords
