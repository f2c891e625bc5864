"""`build_corpus`: checks the inputs, then runs the corpus pipeline on the configured Beam runner."""

from __future__ import annotations

import json
from collections.abc import Sequence

from emojax.corpus.config import CorpusConfig
from emojax.corpus.readers import CorpusError, file_format, read_label_names


def check_inputs(config: CorpusConfig) -> None:
    """Fails early, naming the file, for inputs the pipeline could not read at all."""
    from apache_beam.io.filesystems import FileSystems

    for pattern in config.inputs:
        matches = FileSystems.match([pattern])[0].metadata_list
        if not matches:
            raise CorpusError(f"{pattern}: no such file")
        for m in matches:
            fmt = file_format(m.path, config.reader)
            if fmt == "parquet":
                import pyarrow.parquet as pq

                try:
                    with FileSystems.open(m.path) as f:
                        pq.ParquetFile(f).schema_arrow  # noqa: B018  (reads the footer)
                except Exception as e:  # pyarrow raises several types for a corrupt footer
                    raise CorpusError(f"{m.path}: not a readable Parquet file ({e})") from None
            elif fmt == "csv":
                with FileSystems.open(m.path) as f:
                    head = f.readline()
                try:
                    head.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise CorpusError(f"{m.path}: the CSV header is not UTF-8") from None
                if not head.strip():
                    raise CorpusError(f"{m.path}: empty file or empty header (a CSV corpus needs a header row)")
    if config.labels_file:
        read_label_names(config.labels_file)


def build_corpus(config: CorpusConfig, beam_args: Sequence[str] = ()) -> dict:
    """Runs the corpus stage and returns its manifest. `beam_args` are Beam pipeline options
    (default: the local DirectRunner)."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from emojax.pipelines import corpus as pipeline
    from emojax.tokenizer import load_tokenizer

    check_inputs(config)
    tokenizer = load_tokenizer(config.tokenizer)
    pad_id = getattr(tokenizer, "PAD", 0)
    shards_dir = FileSystems.join(config.out, "shards")
    for folder in (config.out, shards_dir) + ((FileSystems.join(config.out, "packed"),) if config.pack_length else ()):
        if not FileSystems.exists(folder):
            FileSystems.mkdirs(folder)
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as p:
        pipeline.build(p, config, tokenizer.fingerprint, pad_id)
    with FileSystems.open(FileSystems.join(config.out, "manifest.json")) as f:
        manifest = json.loads(f.read())
    # Shards of an earlier build with another shard count would be read as part of this corpus.
    current = {s["name"] for s in manifest["shards"]}
    stale = [m.path for m in FileSystems.match([FileSystems.join(shards_dir, "*.parquet")])[0].metadata_list
             if m.path.rsplit("/", 1)[-1] not in current]
    if stale:
        FileSystems.delete(stale)
    return manifest
