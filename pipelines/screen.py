"""The screening pipeline: samples -> shards by sample id -> scored on the workers -> one Parquet file per shard.

    samples     (emojax.corpus.samples.Sample, read and checked by the driver, emojax.screen.run)
      -> shard  (sha256 of the sample id mod n_shards; shards already written with this run's fingerprint dropped)
      -> group  (every shard to do, the empty ones too)
      -> score  (a DoFn whose worker loads the scorer once, at setup, and scores a shard in batches, in sample-id
                 order)
      -> write  (shards/part-IIIII-of-NNNNN.parquet, rows sorted by sample id, fixed writer settings, the
                 fingerprint in the file's metadata, written to a temporary name and renamed)

The scorer is what the driver passes in: a picklable spec with `schema` (the shard's pyarrow schema) and `load()`
(the worker's scorer, whose `score(samples)` gives one row per sample). The pipeline knows nothing of models: the
driver (emojax.screen.run) builds the spec, merges the shards, flags and writes the manifest.

Runs on any Beam runner. A shard's bytes are a function of its samples and the spec alone (the batches are cut in
sample-id order), so they are identical across runners and worker counts; a shard whose file holds this run's
fingerprint is never recomputed, so a killed run resumes shard by shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from emojax.corpus.samples import Sample
from emojax.pipelines.outputs import disk_full_in, parquet_bytes, write_atomic, sha256_hex, shard_path

FINGERPRINT_KEY = b"emojax.screen.fingerprint"


def shard_of(sample_id: str, n_shards: int) -> int:
    return int(sha256_hex("screen:" + sample_id)[:16], 16) % n_shards


def shard_fingerprint(path: str) -> str | None:
    """The fingerprint a shard file was written with; None when it is absent or unreadable (then it is redone)."""
    if not FileSystems.exists(path):
        return None
    try:
        with FileSystems.open(path) as f:
            metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value is not None else None


def shards_to_do(out: str, n_shards: int, fingerprint: str) -> list[int]:
    """The shards whose file is missing, unreadable or from a run with other inputs or settings."""
    return [i for i in range(n_shards) if shard_fingerprint(shard_path(out, i, n_shards)) != fingerprint]


class ScoreShard(beam.DoFn):
    """(shard index, samples) -> the shard's file, written atomically; yields its index."""

    def __init__(self, spec, out: str, n_shards: int, fingerprint: str):
        self.spec = spec
        self.out = out
        self.n_shards = n_shards
        self.fingerprint = fingerprint

    def setup(self):
        self.scorer = self.spec.load()

    def process(self, item: tuple[int, dict]) -> Iterable[int]:
        index, grouped = item
        samples = sorted(grouped["samples"], key=lambda s: s.sample_id)
        rows = self.scorer.score(samples)
        schema = self.spec.schema.with_metadata({FINGERPRINT_KEY: self.fingerprint.encode()})
        write_atomic(shard_path(self.out, index, self.n_shards), parquet_bytes(rows, schema))
        yield index


def build(p: beam.Pipeline, samples: Sequence[Sample], todo: Sequence[int], spec, out: str, n_shards: int,
          fingerprint: str) -> None:
    """Adds the scoring of the shards `todo` to pipeline `p`."""
    wanted = frozenset(todo)
    keyed = (p | "Samples" >> beam.Create(list(samples))
               | "ShardKey" >> beam.Map(lambda s: (shard_of(s.sample_id, n_shards), s))
               | "ToDo" >> beam.Filter(lambda kv: kv[0] in wanted))
    every_shard = p | "ShardIds" >> beam.Create([(i, None) for i in sorted(wanted)])  # empty shards are written too
    _ = ({"samples": keyed, "ids": every_shard}
         | "GroupShards" >> beam.CoGroupByKey()
         | "Score" >> beam.ParDo(ScoreShard(spec, out, n_shards, fingerprint)))


def score_shards(samples: Sequence[Sample], todo: Sequence[int], spec, out: str, n_shards: int, fingerprint: str,
                 beam_args: Sequence[str] = ()) -> None:
    """Runs the pipeline over the shards `todo` (nothing when empty). `beam_args`: Beam pipeline options (default:
    the local DirectRunner). A full disk is a one-line DiskFullError; rerunning resumes."""
    if not todo:
        return
    folder = FileSystems.join(out, "shards")
    if not FileSystems.exists(folder):
        FileSystems.mkdirs(folder)
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    try:
        with beam.Pipeline(options=options) as p:
            build(p, samples, todo, spec, out, n_shards, fingerprint)
    except Exception as e:
        full = disk_full_in(e, out)
        if full is None:
            raise
        raise full from None
