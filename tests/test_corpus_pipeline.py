"""The corpus pipeline: each transform under TestPipeline, then end to end, bad input and determinism."""

import json
import subprocess
import sys

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from emojax.pipelines.corpus import build_corpus
from emojax.corpus.config import CorpusConfig
from emojax.corpus.generator import GeneratorConfig
from emojax.corpus.readers import CorpusError, RawRecord, ReaderSpec
from emojax.pipelines import corpus as pipeline
from emojax.pipelines import outputs

LABELS = pipeline.label_table(CorpusConfig())


def rec(doc_id, text, labels=("calm",), error=None, source="f.jsonl", split=""):
    return RawRecord(source=source, location=f"line {doc_id}", doc_id=str(doc_id), text=text, labels=labels,
                     error=error, split=split)


# ---- one transform at a time ---------------------------------------------------------------------------

def test_validate_routes_bad_records_with_reasons():
    records = [rec(1, "fine text"), rec(2, "   "), rec(3, "x" * 50), rec(4, "ok", labels=("nope",)),
               rec(5, None, error="missing column(s) ['text']")]
    with BeamTestPipeline() as p:
        out = p | beam.Create(records) | beam.ParDo(pipeline.Validate(LABELS, max_chars=40)).with_outputs(
            pipeline.REJECTED, main="ok")
        assert_that(out.ok | beam.Map(lambda r: r.doc_id), equal_to(["1"]), label="ok")
        assert_that(out[pipeline.REJECTED] | beam.Map(lambda r: (r["doc_id"], r["reason"].split(" ")[0])),
                    equal_to([("2", "empty"), ("3", "text"), ("4", "unknown"), ("5", "missing")]),
                    label="rejected")


def test_normalise_nfc_and_whitespace():
    with BeamTestPipeline() as p:
        out = (p | beam.Create([rec(1, "  Cafe\u0301  \t time\r\n\n\n\nnext  ")])
                 | beam.Map(pipeline.normalise_record) | beam.Map(lambda r: r.text))
        assert_that(out, equal_to(["Caf\u00e9 time\n\nnext"]))


def test_dedupe_keeps_the_smallest_doc_id():
    records = [rec("b", "same words"), rec("a", "same words"), rec("c", "other words")]
    with BeamTestPipeline() as p:
        out = (p | beam.Create(records) | beam.Map(lambda r: (pipeline.sha256_hex(r.text), r))
                 | beam.GroupByKey() | beam.FlatMap(pipeline.keep_first).with_outputs(pipeline.REJECTED, main="ok"))
        assert_that(out.ok | beam.Map(lambda r: r.doc_id), equal_to(["a", "c"]), label="kept")
        assert_that(out[pipeline.REJECTED] | beam.Map(lambda r: (r["doc_id"], r["reason"], r["kind"])),
                    equal_to([("b", "duplicate of a", "duplicate")]), label="dupes")


def test_tokenize_makes_schema_rows_with_a_stable_split():
    config = CorpusConfig(max_tokens=5)
    with BeamTestPipeline() as p:
        out = (p | beam.Create([rec("doc-1", "hello world", labels=("calm", "afraid"))])
                 | beam.ParDo(pipeline.Tokenize(config, LABELS)))
        split = pipeline.assign_split(rec("doc-1", "x"), config.val_fraction, config.test_fraction)
        assert_that(out | beam.Map(lambda r: (r["tokens"], r["n_tokens"], r["label"], r["label_ids"], r["split"])),
                    equal_to([([256, 104, 101, 108, 108], 5, "calm,afraid", [LABELS["calm"], 0], split)]))


def test_split_fractions_follow_the_config():
    splits = [pipeline.assign_split(rec(f"d{i}", "x"), 0.1, 0.2) for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.03 and abs(splits.count("val") / 5000 - 0.1) < 0.03
    # a split the source assigned (implicit scenarios, the world's documents) is kept
    assert pipeline.assign_split(rec("x", "t", source="generated/implicit", split="implicit"), 0.1, 0.1) == "implicit"
    assert pipeline.assign_split(rec("x", "t", split="val"), 0.1, 0.1, {"": "train"}) == "val"


def test_generate_items_cover_the_work_list():
    config = CorpusConfig(generator=GeneratorConfig(concepts=("calm",), n_topics=2, stories_per_topic=1))
    work = pipeline.generator_work(config)
    with BeamTestPipeline() as p:
        out = p | beam.Create(work) | beam.FlatMap(pipeline.generate_item, seed=0) | beam.Map(lambda r: r.doc_id)
        expected = [f"story/calm/{t}/0" for t in (pipeline.load_catalogue().topics[0].topic,
                                                   pipeline.load_catalogue().topics[1].topic)]
        expected += [f"neutral/{pipeline.load_catalogue().topics[t].topic}/{k}" for t in (0, 1) for k in range(3)]
        expected += [f"implicit/calm/{i}" for i in range(len(pipeline.load_catalogue().concept("calm").scenarios))]
        assert_that(out, equal_to(expected))


# ---- end to end ----------------------------------------------------------------------------------------

SMALL = GeneratorConfig(concepts=("desperate", "calm", "afraid"), n_topics=6, stories_per_topic=2)


def _read_shards(out):
    import glob

    return [pq.read_table(f).to_pylist() for f in sorted(glob.glob(f"{out}/shards/*.parquet"))]


def test_end_to_end_builtin_corpus(tmp_path):
    out = tmp_path / "corpus"
    manifest = build_corpus(CorpusConfig(out=str(out), generator=SMALL, n_shards=3))
    shards = _read_shards(out)
    rows = [r for shard in shards for r in shard]
    assert len(shards) == 3 and manifest["documents_written"] == len(rows)
    n_stories, n_neutral = 3 * 6 * 2, 6 * 3
    assert manifest["documents_in"] == n_stories + n_neutral + sum(
        len(pipeline.load_catalogue().concept(c).scenarios) for c in SMALL.concepts)
    assert manifest["rejected"] == 0 and manifest["deduplicated"] == 0
    assert {r["label"] for r in rows} == {"desperate", "calm", "afraid", "neutral"}
    from emojax.tokenizer import ByteTokenizer

    for r in rows:
        assert ByteTokenizer().decode(r["tokens"]) == r["text"][: len(ByteTokenizer().decode(r["tokens"]))]
        assert r["label_id"] == (-1 if r["label"] == "neutral" else manifest["label_ids"][r["label"]])
    for shard in shards:
        assert [r["doc_id"] for r in shard] == sorted(r["doc_id"] for r in shard)
    assert sum(manifest["per_split"].values()) == len(rows)
    assert (out / "rejected.jsonl").read_text() == ""
    # a rebuild with another shard count leaves no stale shards behind
    build_corpus(CorpusConfig(out=str(out), generator=SMALL, n_shards=2))
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"part-0000{i}-of-00002.parquet" for i in (0, 1)]


def test_builtin_corpus_holds_out_whole_topics_and_document_split_stays_available(tmp_path):
    from emojax.corpus.generator import generate

    topic_of = {d.doc_id: d.topic for d in generate(SMALL)}
    build_corpus(CorpusConfig(out=str(tmp_path / "t"), generator=SMALL, n_shards=2))  # split_by=auto
    rows = [r for shard in _read_shards(tmp_path / "t") for r in shard]
    splits_of_topic = {}
    for r in rows:
        if r["source"] != "generated/implicit":
            splits_of_topic.setdefault(topic_of[r["doc_id"]], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of_topic.values())  # no topic in two splits
    assert sorted(s for (s,) in splits_of_topic.values()) == ["test", "train", "train", "train", "train", "val"]
    assert {r["split"] for r in rows if r["source"] == "generated/implicit"} == {"implicit"}

    build_corpus(CorpusConfig(out=str(tmp_path / "d"), generator=SMALL, n_shards=2, split_by="document"))
    for r in (r for shard in _read_shards(tmp_path / "d") for r in shard):
        implicit = "implicit" if r["source"] == "generated/implicit" else ""
        assert r["split"] == pipeline.assign_split(rec(r["doc_id"], "x", split=implicit), 0.1, 0.1)

    topics = [f"topic {i}" for i in range(100)]
    for n, expected in ((100, (80, 10, 10)), (20, (16, 2, 2)), (3, (1, 1, 1)), (2, (2, 0, 0))):
        got = list(pipeline.topic_splits(topics[:n], 0.1, 0.1).values())
        assert tuple(got.count(s) for s in ("train", "val", "test")) == expected


def test_user_corpus_keeps_the_document_hash_split(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"Story number {i}.", "label": "calm", "topic": "work"}) + "\n"
                            for i in range(60)))
    build_corpus(CorpusConfig(out=str(tmp_path / "o"), inputs=(str(path),), n_shards=1))  # split_by=auto
    rows = _read_shards(tmp_path / "o")[0]
    assert len(rows) == 60 and {r["split"] for r in rows} == {"train", "val", "test"}
    for r in rows:
        assert r["split"] == pipeline.assign_split(rec(r["doc_id"], "x"), 0.1, 0.1)
    with pytest.raises(ValueError, match="split_by=topic needs the built-in generator"):
        CorpusConfig(inputs=(str(path),), split_by="topic")
    with pytest.raises(ValueError, match="split_by must be one of"):
        CorpusConfig(split_by="topics")


def test_bad_input_rows_are_rejected_with_location_and_counts_add_up(tmp_path):
    good = [{"text": f"A perfectly fine story number {i}.", "label": "calm"} for i in range(4)]
    lines = [json.dumps(r).encode() for r in good]
    lines += [b"", json.dumps({"text": "   ", "label": "calm"}).encode(), b'{"text": "caf\xe9 bad", "label": "calm"}',
              json.dumps({"text": "unknown label here", "label": "flabbergasted"}).encode(),
              json.dumps({"label": "calm"}).encode(), json.dumps({"text": "x" * 500, "label": "calm"}).encode(),
              json.dumps(good[0]).encode()]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "emojax.cli", "corpus", "build", "--input", str(path), "--out",
                        str(out), "--shards", "2", "max_chars=200"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "documents_written" in r.stdout and "rejected.jsonl" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {x["location"]: x["reason"] for x in rejected}
    assert reasons["line 5"] == "empty line"
    assert reasons["line 6"] == "empty text"
    assert reasons["line 7"].startswith("invalid UTF-8")
    assert reasons["line 8"].startswith("unknown label(s) ['flabbergasted']")
    assert reasons["line 9"].startswith("missing column(s) ['text']")
    assert reasons["line 10"].startswith("text has 500 characters")
    assert reasons["line 11"] == "duplicate of corpus.jsonl:1"
    assert all(x["source"] == str(path) for x in rejected)
    assert manifest["documents_written"] == 4 and manifest["rejected"] == 6 and manifest["deduplicated"] == 1
    assert manifest["documents_in"] == manifest["documents_written"] + manifest["rejected"] + manifest["deduplicated"]


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"definitely not parquet")
    with pytest.raises(CorpusError, match="broken.parquet: not a readable Parquet file"):
        build_corpus(CorpusConfig(out=str(tmp_path / "o"), inputs=(str(bad),)))
    with pytest.raises(CorpusError, match="missing.jsonl: no such file"):
        build_corpus(CorpusConfig(out=str(tmp_path / "o"), inputs=(str(tmp_path / "missing.jsonl"),)))
    r = subprocess.run([sys.executable, "-m", "emojax.cli", "corpus", "build", "--input", str(bad), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "broken.parquet" in r.stderr


def test_csv_parquet_and_multilabel_inputs(tmp_path):
    import pyarrow as pa

    (tmp_path / "labels.txt").write_text("admiration\ncalm\nafraid\n")
    (tmp_path / "a.csv").write_text('id,body,ids\nx1,"a line, with a comma",1\nx2,"two labels here","1,2"\n'
                                    'x3,"bad id",7\n')
    pq.write_table(pa.table({"id": ["p1"], "body": ["from parquet"], "ids": ["0"]}), tmp_path / "b.parquet")
    manifest = build_corpus(CorpusConfig(
        out=str(tmp_path / "o"), inputs=(str(tmp_path / "a.csv"), str(tmp_path / "b.parquet")),
        reader=ReaderSpec(text_column="body", label_column="ids", id_column="id"),
        labels_file=str(tmp_path / "labels.txt"), extra_labels=("admiration",), n_shards=1))
    rows = {r["doc_id"]: r for shard in _read_shards(tmp_path / "o") for r in shard}
    assert set(rows) == {"x1", "x2", "p1"}
    assert rows["x2"]["label"] == "calm,afraid" and rows["p1"]["label"] == "admiration"
    assert rows["p1"]["label_id"] == 171
    assert manifest["rejected"] == 1


def test_same_shards_in_memory_and_multiprocess(tmp_path):
    config = CorpusConfig(generator=GeneratorConfig(concepts=("calm", "afraid"), n_topics=4), n_shards=2)
    import dataclasses

    a = build_corpus(dataclasses.replace(config, out=str(tmp_path / "a")), ["--direct_running_mode=in_memory"])
    b = build_corpus(dataclasses.replace(config, out=str(tmp_path / "b")),
                     ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert a == b
    for name in [s["name"] for s in a["shards"]] :
        assert (tmp_path / "a" / "shards" / name).read_bytes() == (tmp_path / "b" / "shards" / name).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_prompts_and_collect_round_trip(tmp_path):
    from emojax.corpus.prompts import collect_responses, write_prompts

    n = write_prompts(tmp_path / "prompts.jsonl", stories_per_prompt=2, concepts=("calm",), n_topics=2)
    prompts = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert n == 2 and "calm" in prompts[0]["prompt"] and prompts[0]["topic"]
    good = " ".join(["She set the cup down and watched the light move across the floor."] * 8)
    responses = [{"id": prompts[0]["id"], "response": f"{good}\n###\nShe was calm. Too short."},
                 {"id": "nonsense", "response": "x"}]
    (tmp_path / "responses.jsonl").write_text("\n".join(json.dumps(r) for r in responses))
    result = collect_responses(tmp_path / "responses.jsonl", tmp_path / "corpus.jsonl")
    assert result["kept"] == 1 and len(result["rejected"]) == 2
    row = json.loads((tmp_path / "corpus.jsonl").read_text())
    assert row["label"] == "calm" and row["topic"] == prompts[0]["topic"]


def test_pack_makes_fixed_length_rows_without_losing_tokens():
    rows = [{"doc_id": f"d{i}", "split": s, "tokens": list(range(10 * i, 10 * i + n))}
            for i, (s, n) in enumerate([("train", 7), ("val", 5), ("train", 12), ("train", 3)])]
    packed = outputs.pack(rows, length=8, pad_id=-1)
    assert all(len(r["tokens"]) == 8 for r in packed)
    real = [t for r in packed for t in r["tokens"][: r["n_real"]]]
    assert real == list(range(0, 7)) + list(range(20, 32)) + list(range(30, 33))
    assert packed[-1]["n_real"] == 22 - 16 and packed[-1]["tokens"][6:] == [-1, -1]
    assert packed[0]["doc_ids"] == ["d0", "d2"] and packed[1]["doc_ids"] == ["d2"]


def test_packed_shards_are_written(tmp_path):
    manifest = build_corpus(CorpusConfig(out=str(tmp_path / "c"), generator=GeneratorConfig(
        concepts=("calm",), n_topics=3), n_shards=2, pack_length=64))
    files = sorted((tmp_path / "c" / "packed").iterdir())
    assert [f.name for f in files] == [s["name"] for s in manifest["shards"]]
    table = pq.read_table(files[0]).to_pylist()
    assert table and all(len(r["tokens"]) == 64 for r in table)


# ---- the world's corpus (generator.kind=world) -----------------------------------------------------------

WORLD = GeneratorConfig(kind="world", concepts=("desperate", "calm", "afraid"), stories_per_emotion=(4, 2, 2),
                        implicit_per_emotion=2, neutral_per_topic=1, suite_scenarios=12)


def test_world_corpus_takes_its_splits_from_the_world_and_writes_its_suites(tmp_path):
    from emojax.experiment.suite import load_suite
    from emojax.world import World, emotion_words_in

    out = tmp_path / "w"
    manifest = build_corpus(CorpusConfig(out=str(out), generator=WORLD, n_shards=2))
    rows = [r for shard in _read_shards(out) for r in shard]
    n_topics = len(pipeline.load_catalogue().topics)
    assert manifest["rejected"] == 0 and manifest["documents_written"] == len(rows) == 3 * 8 + 3 * 2 + n_topics
    world = World(WORLD.world)
    for r in rows:
        kind = r["source"]
        if kind == "world/fit":  # world/fit/<split>/<emotion>/<n>
            assert r["split"] == r["doc_id"].split("/")[2]
        elif kind == "world/implicit":
            assert r["split"] == "implicit" and r["text"].endswith("Assistant:")
        else:
            assert kind == "world/neutral" and r["label"] == "neutral"
            topic = next(t for t, x in enumerate(pipeline.load_catalogue().topics) if f"/{x.topic}/" in r["doc_id"])
            assert r["split"] == world.neutral_dialogue(topic, 0).split
        if kind != "world/neutral":
            assert not emotion_words_in(r["text"]), r["text"]
    assert manifest["per_split"]["implicit"] == 6 and sum(manifest["per_split"].values()) == len(rows)
    assert {s: sum(1 for r in rows if r["split"] == s and r["source"] == "world/fit") for s in ("train", "val", "test")
            } == {"train": 12, "val": 6, "test": 6}
    suites = sorted(p.name for p in (out / "suites").iterdir())
    assert suites == ["world_deference.yaml", "world_dilemma.yaml", "world_task.yaml"]
    suite = load_suite(str(out / "suites" / "world_dilemma.yaml"))
    assert len(suite.scenarios) == 12 and suite.outcomes[0].positive == "coerce"
    # the same folder rebuilt from the story generator holds no stale world suites
    build_corpus(CorpusConfig(out=str(out), generator=GeneratorConfig(concepts=("calm",), n_topics=2), n_shards=2))
    assert not list((out / "suites").glob("*.yaml"))


def test_no_heldout_situation_of_the_world_corpus_is_in_the_models_training_text():
    """The built-in model's default training text and a world corpus of the same split settings: every val, test
    and implicit situation of the corpus is absent from the training documents (and from neutral topics alike)."""
    from emojax.train import preset_config
    from emojax.train.data import train_and_heldout

    train_config = preset_config("default", n_documents=4000)
    assert train_config.data == "world"
    corpus = CorpusConfig(generator=GeneratorConfig(kind="world", world=train_config.world,
                                                    stories_per_emotion=(2, 2, 2), implicit_per_emotion=3))
    records = [r for item in pipeline.generator_work(corpus)
               for r in pipeline.generate_item(item, 0, corpus.generator.world)]
    train_docs, eval_docs = train_and_heldout(train_config)
    situations = [r for r in records if r.source != "world/neutral"]
    heldout = {r.topic for r in situations if r.split in ("val", "test", "implicit")}
    trained = {d.topic for d in train_docs if d.source != "world/neutral"}
    assert len(heldout) > 900 and len(trained) > 2500
    assert len(next(iter(heldout)).split("/")) == len(next(iter(trained)).split("/")) == 8  # situation keys alike
    assert not heldout & trained
    assert not {d.topic for d in eval_docs} & trained  # the model's own held-out documents are new situations too
    assert {r.split for r in situations} == {"train", "val", "test", "implicit"}
    neutral_heldout = {r.topic for r in records if r.source == "world/neutral" and r.split != "train"}
    assert neutral_heldout and not neutral_heldout & {d.topic for d in train_docs if d.source == "world/neutral"}


def test_world_generator_settings_are_checked():
    with pytest.raises(ValueError, match=r"\['n_topics'\] apply to kind=stories, not kind=world"):
        GeneratorConfig(kind="world", n_topics=3)
    with pytest.raises(ValueError, match=r"\['stories_per_emotion'\] apply to kind=world"):
        GeneratorConfig(stories_per_emotion=(1, 1, 1))
    with pytest.raises(ValueError, match="kind must be one of"):
        GeneratorConfig(kind="novels")
    with pytest.raises(ValueError, match="split_by=document does not apply to generator.kind=world"):
        CorpusConfig(generator=WORLD, split_by="document")
    assert not CorpusConfig(generator=WORLD).by_topic and CorpusConfig().by_topic
