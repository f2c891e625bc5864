"""Settings of the corpus stage (one frozen dataclass; YAML and key=value overrides change only what differs)."""

from __future__ import annotations

import dataclasses

from emojax.config_loader import config_section, non_negative, positive, range_violations, ranged
from emojax.digest import digest, fingerprinted
from emojax.corpus.generator import GeneratorConfig
from emojax.corpus.readers import ReaderSpec

SPLIT_BY = ("auto", "topic", "document")


@config_section("corpus", derived={"out": "output", "tokenizer": "tokenizer"})
@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    out: str = "runs/default/corpus"
    inputs: tuple[str, ...] = ()  # files or globs (any Beam filesystem); empty: the built-in generator (`generator`)
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
    # topic: whole topics of the story generator go to val/test (held out: never seen in train), the fractions
    # counting topics; document: each document by sha256 of its id; auto: topic for the story generator,
    # document for `inputs` (user rows carry no topic). Implicit scenarios are their own split either way. The
    # world (generator.kind=world) splits by situation itself (generator.world's fractions): auto only, and
    # val_fraction / test_fraction above do not apply to it.
    split_by: str = "auto"

    def __post_init__(self):
        # The declared ranges again, for library callers that build this class directly: a negative pack_length
        # would never fill a row (the packer would loop forever).
        problems = range_violations(self)
        if problems:
            raise ValueError("; ".join(problems))
        if not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ValueError("val_fraction + test_fraction must be in [0, 1)")
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        if self.split_by == "topic" and self.inputs:
            raise ValueError("split_by=topic needs the built-in generator's topics; rows read from inputs carry "
                             "none: use split_by=document (or auto)")
        if self.world and self.split_by != "auto":
            raise ValueError(f"split_by={self.split_by} does not apply to generator.kind=world: the world puts each "
                             "document in its situation's split (generator.world's fractions); use split_by=auto")

    @property
    def world(self) -> bool:
        """Whether the corpus is the built-in world's (no inputs, generator.kind=world)."""
        return not self.inputs and self.generator.kind == "world"

    @property
    def by_topic(self) -> bool:
        """Whether documents are split by topic (else by doc id)."""
        return self.split_by == "topic" or (self.split_by == "auto" and not self.inputs and not self.world)

    def fingerprint(self) -> str:
        """Hash of every setting that changes the shards (not where they are written)."""
        d = fingerprinted(self)
        d.pop("out")
        return digest(d)
