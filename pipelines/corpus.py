"""The corpus pipeline: sources -> validate -> normalise -> dedupe -> split -> tokenize -> Parquet shards.

    read (built-in generator: stories or the world | JSONL/CSV/Parquet files)
      -> validate   (empty text, invalid UTF-8, unknown label, over-long text, missing column -> rejected)
      -> unique ids (a doc id seen twice: the first by source and location is kept, the rest rejected)
      -> normalise  (NFC, whitespace)
      -> dedupe     (exact, on sha256 of the normalised text; the smallest doc_id is kept)
      -> split      (train/val/test; implicit scenarios are their own split)
      -> tokenize   (the model's tokenizer, created once per worker; rows cut to max_tokens, counted)
      -> shards     (fixed count, rows sorted by doc_id) + rejected.jsonl + manifest.json

Splits (`split_by`): the story generator's corpus is split by topic (the default, "auto"): its topics, ordered
by sha256, give the first test_fraction of them to test and the next val_fraction to val (at least one topic each
when there are 3 or more), and every document of a topic goes where its topic does, so val and test topics are
never seen in train. User corpora (and split_by=document) split each document by sha256 of its doc id. The
world's corpus (generator.kind=world) comes with its splits: each document is in its situation's split
(train/val/test/implicit, held out by generator.world's split_seed, the one the built-in model trained with), and
the world's choice scenes are written beside the shards as experiment suites (suites/world_*.yaml).

Runs on any Beam runner. Every output is a pure function of the input and the config (hashes, sorted rows,
no timestamps), so shards and manifest are byte-identical across runners and worker counts.

Nothing is dropped silently: every input row is written, rejected or deduplicated, each rejection is in
rejected.jsonl with its source, location and reason, and the manifest is written only if
documents_in == documents_written + rejected + deduplicated. Every file is written to a temporary name and
renamed over the old one (local paths through emojax.fileio, fsynced), so a crash or a full disk leaves whole
files; a rerun rewrites them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from emojax.corpus.build import check_inputs, check_position_limit
from emojax.corpus.catalogue import NEUTRAL, load_catalogue
from emojax.corpus.config import CorpusConfig
from emojax.corpus.generator import implicit_scenarios, neutral_dialogue, story, validate_story
from emojax.corpus.readers import RawRecord, read_label_names, read_records
from emojax.corpus.world_config import WorldConfig
from emojax.locks import writer_lock
from emojax.pipelines.outputs import (disk_full_in, location_key, sha256_hex, write_atomic, write_manifest,
                                      write_rejected, write_shard)
from emojax.tokenizer import load_tokenizer
from emojax.world import World, emotion_words_in
from emojax.world.suites import suite_texts

REJECTED = "rejected"
WORLD_UNNAMED = ("world/fit", "world/implicit")  # world sources whose text never names an emotion
SUITES = "suites"  # the world's choice scenes as experiment suites, beside the shards
TRUNCATED = "truncated"
def _unit_interval(key: str) -> float:
    return int(sha256_hex(key)[:16], 16) / 2**64


# ---- sources -------------------------------------------------------------------------------------------

def generator_work(config: CorpusConfig) -> list[tuple]:
    """One small work item per generated document, so generation itself is spread over workers."""
    gen = config.generator
    catalogue = load_catalogue()
    if gen.kind == "world":
        return _world_work(gen, gen.world_emotions())
    concepts = list(gen.concepts) or catalogue.names_list
    n_topics = min(gen.n_topics, len(catalogue.topics))
    work = [("story", c, t, n) for c in concepts for t in range(n_topics) for n in range(gen.stories_per_topic)]
    work += [("neutral", t, k) for t in range(n_topics)
             for k in range(min(gen.neutral_per_topic, len(catalogue.topics[t].dialogues)))]
    if gen.implicit:
        work += [("implicit", c) for c in concepts]
    return work


def _world_work(gen, emotions: list[int]) -> list[tuple]:
    """The world's fit stories (per emotion and split), implicit scenarios (per emotion) and neutral dialogues
    (per catalogue topic), one item each; `emotions` are indices among the world's emotions."""
    topics = load_catalogue().topics
    work = [("world-fit", split, e, n) for split, count in zip(("train", "val", "test"), gen.stories_per_emotion)
            for e in emotions for n in range(count)]
    if gen.implicit:
        work += [("world-implicit", e, n) for e in emotions for n in range(gen.implicit_per_emotion)]
    work += [("world-neutral", t, k) for t in range(len(topics))
             for k in range(min(gen.neutral_per_topic, len(topics[t].dialogues)))]
    return work


@functools.cache
def _world(config: WorldConfig) -> World:
    """One World per worker process and setting (building its appraisal model takes a few seconds)."""
    return World(config)


def _world_documents(item: tuple, config: WorldConfig) -> list:
    world = _world(config)
    kind = item[0]
    if kind == "world-fit":
        return [world.fit_story(item[2], item[3], item[1])]
    if kind == "world-implicit":  # None: no implicit situation has the emotion as its mode
        return [doc for doc in [world.implicit_scenario(item[1], item[2])] if doc is not None]
    return [world.neutral_dialogue(item[1], item[2])]


def generate_item(item: tuple, seed: int, world: WorldConfig | None = None) -> Iterator[RawRecord]:
    """The documents of one work item. `world`: the world's settings, for world-* items."""
    if item[0].startswith("world-"):
        for d in _world_documents(item, world):
            yield RawRecord(source=d.source, location=d.doc_id, doc_id=d.doc_id, text=d.text, labels=(d.label,),
                            topic=d.topic, split=d.split)
        return
    catalogue = load_catalogue()
    kind = item[0]
    if kind == "story":
        _, concept, t, n = item
        docs = [story(catalogue.concept(concept), catalogue.topics[t], n, seed, catalogue)]
    elif kind == "neutral":
        docs = [neutral_dialogue(catalogue.topics[item[1]], item[2])]
    else:
        docs = implicit_scenarios(catalogue.concept(item[1]))
    for d in docs:
        yield RawRecord(source=d.source, location=d.doc_id, doc_id=d.doc_id, text=d.text, labels=(d.label,),
                        topic=d.topic, split="implicit" if kind == "implicit" else "")


class ReadFiles(beam.DoFn):
    """Every row of one matched file, bad rows included (they carry an error)."""

    def __init__(self, config: CorpusConfig):
        self.config = config

    def setup(self):
        spec = self.config.reader
        if self.config.labels_file:
            spec = dataclasses.replace(spec, label_names=read_label_names(self.config.labels_file))
        self.spec = spec

    def process(self, readable_file) -> Iterator[RawRecord]:
        path = readable_file.metadata.path
        yield from read_records(path, readable_file.read(), self.spec)


# ---- transforms ----------------------------------------------------------------------------------------

def rejection(record: RawRecord, reason: str, kind: str = "invalid") -> dict:
    return {"source": record.source, "location": record.location, "doc_id": record.doc_id, "reason": reason,
            "kind": kind}


class Validate(beam.DoFn):
    """Good records on the main output; each bad one, with its reason, on the 'rejected' output."""

    def __init__(self, known_labels: Iterable[str], max_chars: int):
        self.known = frozenset(known_labels)
        self.max_chars = max_chars

    def process(self, record: RawRecord):
        reason = self.problem(record)
        if reason:
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(record, reason))
        else:
            yield record

    def problem(self, record: RawRecord) -> str | None:
        if record.error:
            return record.error
        if record.text is None or not record.text.strip():
            return "empty text"
        if len(record.text) > self.max_chars:
            return f"text has {len(record.text)} characters, over max_chars={self.max_chars}"
        unknown = [label for label in record.labels if label not in self.known]
        if unknown:
            return (f"unknown label(s) {unknown}: not in the catalogue; declare corpus-specific labels in "
                    "extra_labels")
        if record.source == "generated/story":
            problems = validate_story(record.text, load_catalogue().concept(record.labels[0]))
            if problems:
                return "generated story fails validation: " + "; ".join(problems)
        if record.source in WORLD_UNNAMED:  # fit stories and implicit scenarios never name an emotion
            found = emotion_words_in(record.text, load_catalogue().concept(record.labels[0]))
            if found:
                return f"world document names an emotion: {found}"
        return None


_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC; runs of spaces/tabs become one space; lines are stripped; at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def normalise_record(record: RawRecord) -> RawRecord:
    return dataclasses.replace(record, text=normalise(record.text))


def keep_first_id(item: tuple[str, Iterable[RawRecord]]):
    """Of records with the same doc id, keeps the first by source and location; the rest are rejected (two
    rows with one id would make the split, the shard and every later per-document lookup ambiguous)."""
    doc_id, records = item
    first, *rest = sorted(records, key=lambda r: (*location_key(r.source, r.location), r.text or ""))
    yield first
    for r in rest:
        yield beam.pvalue.TaggedOutput(REJECTED, rejection(
            r, f"duplicate doc id {doc_id!r}, first at {first.source} {first.location}; doc ids must be unique "
               "(fix the repeated id, or set reader.id_column to a unique column)", kind="duplicate_id"))


def keep_first(item: tuple[str, Iterable[RawRecord]]):
    """Of records with the same normalised text, keeps the smallest doc_id; the rest are rejected."""
    _, records = item
    first, *rest = sorted(records, key=lambda r: (r.doc_id, r.source, r.location))
    yield first
    for r in rest:
        yield beam.pvalue.TaggedOutput(REJECTED, rejection(r, f"duplicate of {first.doc_id}", kind="duplicate"))


def topic_splits(topics: Sequence[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Topic -> split of the held-out-topic split. Topics are ranked by sha256 rather than each hashed on its own,
    so a corpus of a few topics still gets val and test topics (one each at least, from 3 topics) and train
    keeps at least one."""
    ranked = sorted(topics, key=lambda t: sha256_hex("split:" + t))
    n = len(ranked)

    def count(fraction: float) -> int:
        return max(round(fraction * n), 1 if fraction > 0 and n >= 3 else 0)

    n_test = max(0, min(count(test_fraction), n - 1))
    n_val = max(0, min(count(val_fraction), n - 1 - n_test))
    return {t: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, t in enumerate(ranked)}


def assign_split(record: RawRecord, val_fraction: float, test_fraction: float,
                 by_topic: dict[str, str] | None = None) -> str:
    """The record's split: the one its source assigned (the world's; implicit scenarios), else its topic's under
    `by_topic` (from `topic_splits`); a record without a topic, or any record when `by_topic` is None, by sha256 of
    its doc id."""
    if record.split:
        return record.split
    if by_topic is not None and record.topic:
        return by_topic[record.topic]
    u = _unit_interval("split:" + record.doc_id)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


class Tokenize(beam.DoFn):
    """Record -> shard row, cut to max_tokens; the doc id of each cut row also goes to the 'truncated' output."""

    def __init__(self, config: CorpusConfig, label_ids: dict[str, int]):
        self.config = config
        self.label_ids = label_ids
        self.by_topic = None
        if config.by_topic:
            topics = [t.topic for t in load_catalogue().topics[: config.generator.n_topics]]
            self.by_topic = topic_splits(topics, config.val_fraction, config.test_fraction)

    def setup(self):
        from emojax.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.config.tokenizer)

    def process(self, record: RawRecord):
        tokens = self.tokenizer.encode(record.text)
        if len(tokens) > self.config.max_tokens:
            tokens = tokens[: self.config.max_tokens]
            yield beam.pvalue.TaggedOutput(TRUNCATED, record.doc_id)
        ids = [self.label_ids[label] for label in record.labels]
        yield {
            "doc_id": record.doc_id, "text_sha256": sha256_hex(record.text), "label": ",".join(record.labels),
            "label_id": ids[0], "label_ids": ids,
            "split": assign_split(record, self.config.val_fraction, self.config.test_fraction, self.by_topic),
            "tokens": tokens, "n_tokens": len(tokens), "source": record.source, "text": record.text,
        }


# ---- the pipeline --------------------------------------------------------------------------------------

def label_table(config: CorpusConfig) -> dict[str, int]:
    """Label name -> id: catalogue concepts 0..170, then extra labels in declared order; neutral is -1."""
    ids = {name: i for i, name in enumerate(load_catalogue().names_list)}
    for extra in config.extra_labels:
        ids.setdefault(extra, len(ids))
    ids[NEUTRAL] = -1
    return ids


def build(p: beam.Pipeline, config: CorpusConfig, tokenizer_fingerprint: str, pad_id: int = 0) -> None:
    """Adds the corpus stage to pipeline `p`."""
    label_ids = label_table(config)
    if config.inputs:
        raw = (p | "Inputs" >> beam.Create(sorted(config.inputs))
                 | "Match" >> fileio.MatchAll()
                 | "Open" >> fileio.ReadMatches()
                 | "Read" >> beam.ParDo(ReadFiles(config)))
    else:
        raw = (p | "Work" >> beam.Create(generator_work(config))
                 | "Generate" >> beam.FlatMap(generate_item, seed=config.generator.seed, world=config.generator.world))
    n_in = raw | "CountIn" >> beam.combiners.Count.Globally()
    checked = raw | "Validate" >> beam.ParDo(Validate(label_ids, config.max_chars)).with_outputs(REJECTED, main="ok")
    unique_ids = (checked.ok
                  | "ById" >> beam.Map(lambda r: (r.doc_id, r))
                  | "GroupById" >> beam.GroupByKey()
                  | "UniqueIds" >> beam.FlatMap(keep_first_id).with_outputs(REJECTED, main="ok"))
    unique = (unique_ids.ok
              | "Normalise" >> beam.Map(normalise_record)
              | "ByTextHash" >> beam.Map(lambda r: (sha256_hex(r.text), r))
              | "GroupByText" >> beam.GroupByKey()
              | "Dedupe" >> beam.FlatMap(keep_first).with_outputs(REJECTED, main="ok"))
    tokenized = unique.ok | "Tokenize" >> beam.ParDo(Tokenize(config, label_ids)).with_outputs(TRUNCATED, main="ok")
    rows = tokenized.ok
    n_truncated = tokenized[TRUNCATED] | "CountTruncated" >> beam.combiners.Count.Globally()
    n = config.n_shards
    keyed = rows | "ShardKey" >> beam.Map(lambda r: (int(sha256_hex("shard:" + r["doc_id"])[:16], 16) % n, r))
    every_shard = p | "ShardIds" >> beam.Create([(i, None) for i in range(n)])  # empty shards are written too
    shards = ({"rows": keyed, "ids": every_shard}
              | "GroupShards" >> beam.CoGroupByKey()
              | "WriteShards" >> beam.Map(write_shard, out=config.out, n_shards=n, pack_length=config.pack_length,
                                         pad_id=pad_id)
              | "ShardList" >> beam.combiners.ToList())
    counts = (rows | "LabelSplit" >> beam.Map(lambda r: (r["label"], r["split"]))
                   | "CountLabelSplit" >> beam.combiners.Count.PerElement()
                   | "CountList" >> beam.combiners.ToList())
    rejected = ((checked[REJECTED], unique_ids[REJECTED], unique[REJECTED]) | "AllRejected" >> beam.Flatten()
                | "RejectedList" >> beam.combiners.ToList())
    _ = rejected | "WriteRejected" >> beam.Map(write_rejected, out=config.out)
    _ = (p | "Once" >> beam.Create([None])
           | "WriteManifest" >> beam.Map(
               write_manifest, out=config.out, config=config, tokenizer_fingerprint=tokenizer_fingerprint,
               label_ids=label_ids, shards=beam.pvalue.AsSingleton(shards),
               counts=beam.pvalue.AsSingleton(counts), rejected=beam.pvalue.AsSingleton(rejected),
               n_in=beam.pvalue.AsSingleton(n_in), n_truncated=beam.pvalue.AsSingleton(n_truncated)))


def _write_suites(config: CorpusConfig) -> None:
    """The world's choice scenes as experiment suites in out/suites/ (world corpus with suite_scenarios > 0); the
    suites of an earlier build are removed otherwise, so the folder always belongs to this corpus."""
    folder = FileSystems.join(config.out, SUITES)
    texts = suite_texts(config.generator.world, config.generator.suite_scenarios) if (
        config.world and config.generator.suite_scenarios) else {}
    if FileSystems.exists(folder):
        stale = [m.path for m in FileSystems.match([FileSystems.join(folder, "*.yaml")])[0].metadata_list
                 if m.path.rsplit("/", 1)[-1] not in texts]
        if stale:
            FileSystems.delete(stale)
    for name, text in texts.items():
        write_atomic(FileSystems.join(folder, name), text.encode("utf-8"))


def build_corpus(config: CorpusConfig, beam_args: Sequence[str] = ()) -> dict:
    """Runs the corpus stage and returns its manifest. `beam_args` are Beam pipeline options
    (default: the local DirectRunner). A full disk is a one-line `DiskFullError`; rerunning completes."""

    check_inputs(config)
    check_position_limit(config)
    tokenizer = load_tokenizer(config.tokenizer)
    pad_id = getattr(tokenizer, "PAD", 0)
    shards_dir = FileSystems.join(config.out, "shards")
    with writer_lock(config.out, what="corpus"):
        for folder in (config.out, shards_dir) + ((FileSystems.join(config.out, "packed"),)
                                                  if config.pack_length else ()):
            if not FileSystems.exists(folder):
                FileSystems.mkdirs(folder)
        _write_suites(config)  # before the manifest, whose presence marks a complete corpus
        options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
        try:
            with beam.Pipeline(options=options) as p:
                build(p, config, tokenizer.fingerprint, pad_id)
        except Exception as e:
            full = disk_full_in(e, config.out)
            if full is None:
                raise
            raise full from None
        with FileSystems.open(FileSystems.join(config.out, "manifest.json")) as f:
            manifest = json.loads(f.read())
        # Shards of an earlier build with another shard count would be read as part of this corpus.
        current = {s["name"] for s in manifest["shards"]}
        stale = [m.path for m in FileSystems.match([FileSystems.join(shards_dir, "*.parquet")])[0].metadata_list
                 if m.path.rsplit("/", 1)[-1] not in current]
        if stale:
            FileSystems.delete(stale)
    return manifest
