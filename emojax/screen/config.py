"""Settings of `emojax screen` (the `screen:` section): the data, the bank and concepts to screen by, the model's own
responses, the shards, and the flag rule."""

from __future__ import annotations

import dataclasses

from emojax.config_loader import config_section, non_negative, positive, unbounded
from emojax.errors import EmojaxError

FLAG_METHODS = ("threshold", "zscore", "top")
FLAG_SCORES = ("diff", "proj")
MODEL_DTYPES = ("float32", "bfloat16")


class ScreenError(EmojaxError):
    """A screen run that cannot go on: no model to run, output of another run in the way, a shard missing."""


@dataclasses.dataclass(frozen=True)
class FlagRule:
    """Which samples are flagged, per concept, by their `by` score (diff = proj - own, or proj alone):
    threshold: score >= value; zscore: (score - mean) / std >= value (over all samples); top: the highest `value`
    fraction (at least one sample). Ties rank by sample id."""

    method: str = "zscore"
    value: float = unbounded(3.0)
    by: str = "diff"

    def __post_init__(self):
        if self.method not in FLAG_METHODS:
            raise ValueError(f"flag.method={self.method!r} is not one of {list(FLAG_METHODS)}")
        if self.by not in FLAG_SCORES:
            raise ValueError(f"flag.by={self.by!r} is not one of {list(FLAG_SCORES)}")
        if self.method == "top" and not 0 < self.value <= 1:
            raise ValueError(f"flag.value={self.value} must be a fraction in (0, 1] for method top")


@config_section("screen")
@dataclasses.dataclass(frozen=True)
class ScreenConfig:
    data: tuple[str, ...] = ()  # prompt/response files: JSONL, CSV or Parquet, plain or chat rows
    bank: str = ""  # the concept bank folder (emojax fit)
    concepts: tuple[str, ...] = ()  # the bank's concepts to screen by
    model: str = ""  # empty: the model the bank was fitted on, as bank.json records it (store_model)
    layer: int | None = non_negative(None)  # residual index; None: the bank's layer (emojax.concepts.layer)
    out: str = ""
    force: bool = False  # use a bank fitted on another model (with a warning) instead of refusing it
    # Prompt + response tokens read per sample (and never past the model's positions); a longer response is cut
    # to fit and counted as truncated. A prompt that leaves no room for a response token is an error.
    max_tokens: int = positive(1024)
    # The model's own greedy response to each prompt is as long as the sample's response, at most this (and at
    # most what the positions left by the batch's longest prompt allow).
    max_new_tokens: int = positive(128)
    batch_size: int = positive(16)  # rows per compiled call (the last batch of a shard is padded to it)
    n_shards: int = positive(8)  # the resumable unit: a shard is scored and written whole
    examples: int = non_negative(10)  # per shard, concept and score: the top samples keeping per-token projections
    flag: FlagRule = FlagRule()
    dtype: str = "float32"  # the model's
    mesh: tuple[int, ...] = positive(())  # (data, fsdp, tensor) over a worker's devices; empty: all on data

    def __post_init__(self):
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"screen.concepts repeats a concept: {list(self.concepts)}")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"screen.dtype={self.dtype!r} is not one of {list(MODEL_DTYPES)}")
        if self.mesh and len(self.mesh) != 3:
            raise ValueError(f"screen.mesh must have 3 entries (data, fsdp, tensor), got {list(self.mesh)}")
