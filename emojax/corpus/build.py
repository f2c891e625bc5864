"""The corpus stage's checks before its pipeline runs (inputs, position limit) and its inputs' versions;
the driver that runs the pipeline is emojax.pipelines.corpus.build_corpus."""

from __future__ import annotations

from pathlib import Path

from emojax.corpus.config import CorpusConfig
from emojax.corpus.readers import CorpusError, file_format, read_label_names
from emojax.errors import ConfigError


def input_versions(config: CorpusConfig) -> list[tuple[str, int, float]]:
    """(path, size in bytes, last modified) of every input file and the labels file, from the filesystem's
    metadata (local or remote, nothing is read): what a run's fingerprint covers, so an edited input rebuilds
    the corpus instead of being skipped as unchanged."""
    from apache_beam.io.filesystems import FileSystems

    patterns = [*config.inputs, *([config.labels_file] if config.labels_file else [])]
    versions = []
    for pattern in patterns:
        try:
            matches = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # noqa: BLE001 - a missing input is reported by the corpus stage itself, naming it
            matches = []
        versions += [(m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in matches] or [(pattern, -1, 0.0)]
    return sorted(versions)


def check_inputs(config: CorpusConfig) -> None:
    """Fails early, naming the file, for inputs the pipeline could not read at all, and for inputs whose rows
    would share doc ids (one file matched twice; two files with one name when ids come from file names)."""
    from apache_beam.io.filesystems import FileSystems

    matched: dict[str, str] = {}  # path -> the input pattern that matched it
    by_name: dict[str, str] = {}  # file name -> path
    for pattern in config.inputs:
        matches = FileSystems.match([pattern])[0].metadata_list
        if not matches:
            raise CorpusError(f"{pattern}: no such file")
        for m in matches:
            if m.path in matched:
                raise CorpusError(f"{m.path}: matched by input {matched[m.path]!r} and by {pattern!r}; list each "
                                  "file once (its rows would be read twice)")
            matched[m.path] = pattern
            name = m.path.rsplit("/", 1)[-1]
            if config.reader.id_column is None and name in by_name:
                raise CorpusError(f"{m.path} and {by_name[name]}: two inputs named {name!r}; default doc ids are "
                                  "'<file name>:<row>', so their rows would share ids. Rename one, or set "
                                  "reader.id_column to a column of unique ids")
            by_name.setdefault(name, m.path)
            _check_readable(m.path, file_format(m.path, config.reader))
    if config.labels_file:
        read_label_names(config.labels_file)


def _check_readable(path: str, fmt: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with FileSystems.open(path) as f:
                pq.ParquetFile(f).schema_arrow  # noqa: B018  (reads the footer)
        except Exception as e:  # pyarrow raises several types for a corrupt footer
            raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    elif fmt == "csv":
        with FileSystems.open(path) as f:
            head = f.readline()
        try:
            head.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CorpusError(f"{path}: the CSV header is not UTF-8") from None
        if not head.strip():
            raise CorpusError(f"{path}: empty file or empty header (a CSV corpus needs a header row)")


def check_position_limit(config: CorpusConfig) -> None:
    """With a checkpoint folder as tokenizer, `max_tokens` may not exceed the model's positions (config.json's
    n_positions for GPT-2, max_position_embeddings for the others): the dump could not run such rows. Longer
    documents are cut to max_tokens, never rejected, and counted in the manifest's documents_truncated."""
    from emojax.models.hf_config import read_hf_config  # the model package imports jax: only when needed

    path = Path(config.tokenizer) / "config.json"
    if config.tokenizer == "byte" or not path.is_file():
        return
    limit, key = read_hf_config(path.parent).position_limit
    if config.max_tokens > limit:
        raise ConfigError(f"max_tokens={config.max_tokens} is above {key}={limit} in {path}: the model has no "
                          f"positions past {limit}. Set max_tokens <= {limit} (longer documents are cut to "
                          "max_tokens and counted as documents_truncated)")
