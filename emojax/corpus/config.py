"""Settings of the corpus stage (one frozen dataclass; YAML and key=value overrides change only what differs)."""

from __future__ import annotations

import dataclasses

from emojax.config_loader import config_section, non_negative, positive, range_violations, ranged
from emojax.digest import digest
from emojax.corpus.generator import GeneratorConfig
from emojax.corpus.readers import ReaderSpec


@config_section("corpus", derived={"out": "output", "tokenizer": "tokenizer"})
@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    out: str = "runs/default/corpus"
    inputs: tuple[str, ...] = ()  # files or globs (any Beam filesystem); empty: the built-in generator
    reader: ReaderSpec = ReaderSpec()
    labels_file: str | None = None  # GoEmotions-style id -> name list for multi-label rows
    extra_labels: tuple[str, ...] = ()  # labels outside the catalogue that the corpus may use
    generator: GeneratorConfig = GeneratorConfig()
    tokenizer: str = "byte"  # "byte", a tokenizer.json, or a checkpoint directory
    max_chars: int = positive(20_000)  # longer texts are rejected, not cut
    max_tokens: int = positive(512)  # token rows are truncated to this many tokens
    n_shards: int = positive(8)
    pack_length: int = non_negative(0)  # > 0: also write packed/ shards of train tokens in rows of exactly this length
    val_fraction: float = ranged(0.1, 0, 1, hi_open=True)
    test_fraction: float = ranged(0.1, 0, 1, hi_open=True)

    def __post_init__(self):
        # The declared ranges again, for library callers that build this class directly: a negative pack_length
        # would never fill a row (the packer would loop forever).
        problems = range_violations(self)
        if problems:
            raise ValueError("; ".join(problems))
        if not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ValueError("val_fraction + test_fraction must be in [0, 1)")

    def fingerprint(self) -> str:
        """Hash of every setting that changes the shards (not where they are written)."""
        d = dataclasses.asdict(self)
        d.pop("out")
        return digest(d)
