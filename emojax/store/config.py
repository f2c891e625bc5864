"""Settings of the dump stage (one frozen dataclass; YAML and key=value overrides change only what differs)."""

from __future__ import annotations

import dataclasses

from emojax.config_loader import config_section, non_negative, positive
from emojax.models.layers import ATTENTION_CHOICES

STORE_DTYPES = ("bfloat16", "float32")


@config_section("dump", derived={"model": "model", "corpus": "input", "out": "output", "attention": "model"})
@dataclasses.dataclass(frozen=True)
class DumpConfig:
    corpus: str = "runs/default/corpus"  # the corpus stage's output folder (manifest.json + shards/)
    model: str = "random:tiny"  # a Hugging Face-format checkpoint folder or a preset
    out: str = "runs/default/activations"  # a folder or a TensorStore kvstore URL (gs://..., s3://...)
    # residual indices to capture; empty: about 1/3, 1/2 and 2/3 of the depth
    layers: tuple[int, ...] = non_negative(())
    dtype: str = "bfloat16"  # token-level activations; pooled means are always float32
    model_dtype: str = "float32"
    attention: str = "xla"  # the attention kernel: xla, cudnn, auto or xla-fused (emojax.models.layers)
    pool_start: int = non_negative(50)  # pooled means average positions >= pool_start (the study's choice)
    # padded sequence lengths; empty: steps of ~1.33x up to the corpus max_tokens
    buckets: tuple[int, ...] = positive(())
    tokens_per_batch: int = positive(8192)  # batch rows per bucket = tokens_per_batch // bucket length
    token_chunk_rows: int = positive(16384)  # token rows per written shard of a token array (the write unit)
    token_read_rows: int = positive(1024)  # token rows per compressed chunk (the read unit)
    doc_chunk_rows: int = positive(1024)  # document rows per written shard of the per-document arrays
    doc_read_rows: int = positive(128)
    writes_in_flight: int = positive(4)  # written shards in flight before the loop waits for the oldest
    mesh: tuple[int, ...] = positive(())  # (data, fsdp, tensor) over this process's devices; empty: all on data
    tokenizer: str = ""  # empty: the model's tokenizer (checkpoints) or "byte" (presets without one)
    verify: bool = False  # reread every complete shard first (checksums) and rewrite the damaged ones

    def __post_init__(self):
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {list(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.pool_start < 0:
            raise ValueError(f"pool_start must be >= 0, got {self.pool_start}")
        for name in ("tokens_per_batch", "token_chunk_rows", "token_read_rows", "doc_chunk_rows",
                     "doc_read_rows", "writes_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.token_chunk_rows % self.token_read_rows:
            raise ValueError("token_chunk_rows must be a multiple of token_read_rows")
        if self.doc_chunk_rows % self.doc_read_rows:
            raise ValueError("doc_chunk_rows must be a multiple of doc_read_rows")
        if any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be increasing positive lengths, got {list(self.buckets)}")
        if self.mesh and len(self.mesh) != 3:
            raise ValueError(f"mesh must have 3 entries (data, fsdp, tensor), got {list(self.mesh)}")


def default_layers(n_layers: int) -> tuple[int, ...]:
    """About 1/3, 1/2 and 2/3 of the depth (the study reads emotion vectors around two thirds)."""
    return tuple(sorted({max(1, round(n_layers * f)) for f in (1 / 3, 1 / 2, 2 / 3)}))


def default_buckets(max_tokens: int, smallest: int = 32) -> tuple[int, ...]:
    """Lengths growing by ~1.33x (multiples of 16 above 32), ending at max_tokens: <~15% padding, few compiles."""
    buckets, b = [], smallest
    while b < max_tokens:
        buckets.append(b)
        b = -(-int(b * 4 / 3) // 16) * 16
    buckets.append(max_tokens)
    return tuple(buckets)
