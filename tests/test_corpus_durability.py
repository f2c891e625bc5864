"""Issue 16 for the corpus stage: every input row accounted for, bad rows reported where they are, duplicate ids
caught, config ranges checked, the model's position limit respected, and atomic writes that a full disk or a
failing collect cannot leave half done.

One messy corpus is built once (in memory) and shared; the pipeline is run as few times as the checks allow.
"""

import errno
import json
import os

import pyarrow.parquet as pq
import pytest

from emojax.config_loader import load_section
from emojax.corpus.build import check_inputs, check_position_limit
from emojax.pipelines.corpus import build_corpus
from emojax.corpus.config import CorpusConfig
from emojax.corpus.generator import GeneratorConfig
from emojax.corpus.readers import CorpusError, ReaderSpec, read_records
from emojax.errors import ConfigError
from emojax.fileio import DiskFullError
from emojax.pipelines import outputs

# Labels are ids into labels.txt (0 calm, 1 afraid); both files are called x.csv and ids come from `id`.
A_CSV = (
    "id,text,label\n"
    "a1,The first good row about the quiet sea.,0\n"
    ",A row of folder a without an id.,0\n"
    '3,He is 6" tall and calm,0\n'
    "a4,Good row four after the stray quote.,1\n"
    "a5,Good row five after the stray quote.,0\n"
    "a6,Good row six after the stray quote.,1\n"
    "a7,A negative label id must not mean the last label.,-1\n"
    "a1,Another text under a repeated id.,0\n"
    "a9,The first good row about the quiet sea.,0\n"  # same text as a1: deduplicated
)
B_CSV = (
    "id,text,label\n"
    "b1,Good row of folder b.,1\n"
    ",A row of folder b without an id.,0\n"  # default id x.csv:2, like folder a's second row
)
GOOD_IDS = {"a1", "x.csv:2", "3", "a4", "a5", "a6", "b1"}


def _config(tmp, out: str) -> CorpusConfig:
    return CorpusConfig(out=str(tmp / out), inputs=(str(tmp / "a" / "x.csv"), str(tmp / "b" / "x.csv")),
                        reader=ReaderSpec(id_column="id"), labels_file=str(tmp / "labels.txt"), max_tokens=24,
                        n_shards=3)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("messy")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    (tmp / "a" / "x.csv").write_text(A_CSV)
    (tmp / "b" / "x.csv").write_text(B_CSV)
    (tmp / "labels.txt").write_text("calm\nafraid\n")
    config = _config(tmp, "mem")
    manifest = build_corpus(config, ["--direct_running_mode=in_memory"])
    out = tmp / "mem"
    rows = {r["doc_id"]: r for f in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    return tmp, config, manifest, rows, rejected


# ---- (6) accounting, stray quotes, label ids, duplicate ids ----------------------------------------------

def test_every_input_row_is_written_rejected_or_deduplicated(messy):
    _, _, manifest, rows, rejected = messy
    assert set(rows) == GOOD_IDS
    assert (manifest["documents_in"], manifest["documents_written"], manifest["rejected"],
            manifest["deduplicated"]) == (11, 7, 3, 1)
    assert manifest["documents_in"] == manifest["documents_written"] + manifest["rejected"] + manifest["deduplicated"]
    assert sorted(r["kind"] for r in rejected) == ["duplicate", "duplicate_id", "duplicate_id", "invalid"]


def test_a_stray_quote_in_an_unquoted_field_swallows_no_rows(messy):
    _, _, _, rows, _ = messy
    assert rows["3"]["text"] == 'He is 6" tall and calm'
    assert {"a4", "a5", "a6"} <= set(rows)


def test_an_unbalanced_quote_rejects_its_line_only():
    data = b'text,label\n"He is 6 tall,calm\ngood one,calm\ngood two,calm\n"a\nb",calm\n"Hi" he said,calm\nlast,calm\n'
    records = list(read_records("q.csv", data, ReaderSpec()))
    good = [(r.location, r.text) for r in records if not r.error]
    bad = {r.location: r.error for r in records if r.error}
    assert good == [("line 3", "good one"), ("line 4", "good two"), ("line 5", "a\nb"), ("line 8", "last")]
    assert bad["line 2"].startswith("unbalanced quote") and bad["line 7"].startswith("bad CSV row")
    assert [r.doc_id for r in records] == [f"q.csv:{i}" for i in range(1, 7)]


def test_negative_label_ids_are_rejected_with_file_and_line(messy):
    tmp, _, _, rows, rejected = messy
    (neg,) = [r for r in rejected if r["doc_id"] == "a7"]
    assert neg["source"] == str(tmp / "a" / "x.csv") and neg["location"] == "line 8"
    assert neg["reason"].startswith("label id '-1' is not an index into the 2 label names")
    assert "a7" not in rows


def test_duplicate_doc_ids_are_rejected_with_where_the_first_is(messy):
    tmp, _, _, rows, rejected = messy
    dup = {r["doc_id"]: r for r in rejected if r["kind"] == "duplicate_id"}
    assert set(dup) == {"a1", "x.csv:2"}
    assert dup["a1"]["location"] == "line 9" and f"first at {tmp / 'a' / 'x.csv'} line 2" in dup["a1"]["reason"]
    # the same default id from two files called x.csv: folder a's row (first by source) is kept
    assert dup["x.csv:2"]["source"] == str(tmp / "b" / "x.csv")
    assert rows["x.csv:2"]["text"] == "A row of folder a without an id."
    assert rows["a1"]["text"] == "The first good row about the quiet sea."


def test_output_is_byte_identical_in_memory_and_multiprocess_with_duplicates(messy):
    tmp, config, manifest, _, _ = messy
    import dataclasses

    other = build_corpus(dataclasses.replace(config, out=str(tmp / "mp")),
                         ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert other == manifest
    names = [s["name"] for s in manifest["shards"]]
    for rel in [f"shards/{n}" for n in names] + ["manifest.json", "rejected.jsonl"]:
        assert (tmp / "mem" / rel).read_bytes() == (tmp / "mp" / rel).read_bytes(), rel


def test_inputs_whose_ids_would_collide_are_refused_before_reading(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jsonl").write_text('{"text": "t", "label": "calm"}\n')
    a, b = str(tmp_path / "a" / "x.jsonl"), str(tmp_path / "b" / "x.jsonl")
    with pytest.raises(CorpusError, match=r"two inputs named 'x.jsonl'.*reader.id_column"):
        check_inputs(CorpusConfig(inputs=(a, b)))
    check_inputs(CorpusConfig(inputs=(a, b), reader=ReaderSpec(id_column="id")))  # ids come from a column
    with pytest.raises(CorpusError, match="matched by input .* list each file once"):
        check_inputs(CorpusConfig(inputs=(a, str(tmp_path / "a" / "*.jsonl")), reader=ReaderSpec(id_column="id")))


def test_an_accounting_mismatch_raises_and_writes_no_manifest(tmp_path):
    shards = [{"name": "part-00000-of-00001.parquet", "rows": 2, "tokens": 5, "sha256": "x"}]
    rejected = [{"kind": "invalid"}, {"kind": "duplicate"}]
    with pytest.raises(outputs.AccountingError, match="5 documents in, but 2 written \\+ 1 rejected \\+ 1 dedup"):
        outputs.write_manifest(None, str(tmp_path), CorpusConfig(), "t", {}, shards, [], rejected, n_in=5)
    assert not (tmp_path / "manifest.json").exists()
    m = outputs.write_manifest(None, str(tmp_path), CorpusConfig(), "t", {}, shards, [], rejected, n_in=4)
    assert (m["documents_in"], m["documents_written"], m["rejected"], m["deduplicated"]) == (4, 2, 1, 1)


# ---- (7) ranges ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("pack_length", -1), ("max_tokens", 0), ("max_chars", -5),
                                       ("test_fraction", 1.5), ("val_fraction", -0.1), ("n_shards", 0)])
def test_corpus_numbers_out_of_range_are_config_errors(key, value, tmp_path):
    with pytest.raises(ValueError, match=key):
        CorpusConfig(**{key: value})
    with pytest.raises(ConfigError, match=key):
        load_section(CorpusConfig, None, [f"{key}={value}"])


def test_pack_refuses_a_non_positive_length_instead_of_looping():
    with pytest.raises(ValueError, match="pack_length"):
        outputs.pack([{"doc_id": "d", "split": "train", "tokens": [1, 2, 3]}], length=-1, pad_id=0)
    with pytest.raises(ValueError, match="n_topics=-1 must be"):
        GeneratorConfig(n_topics=-1)


# ---- (8) the model's position limit ----------------------------------------------------------------------

def _config_json(key: str) -> dict:
    """A checkpoint's config.json whose position limit is 64: GPT-2 (n_positions) or Llama."""
    import dataclasses

    from emojax.models.hf_config import config_to_hf_dict
    from emojax.models.presets import SHAPES

    if key == "n_positions":
        from hf_checkpoints import make_config

        return make_config("gpt2", n_positions=64).to_dict()
    return config_to_hf_dict(dataclasses.replace(SHAPES["tiny"], max_position_embeddings=64))


@pytest.mark.parametrize("key", ["n_positions", "max_position_embeddings"])
def test_max_tokens_above_the_models_positions_is_refused(tmp_path, key):
    (tmp_path / "config.json").write_text(json.dumps(_config_json(key)))
    with pytest.raises(ConfigError, match=f"max_tokens=512 is above {key}=64 in .*config.json"):
        build_corpus(CorpusConfig(out=str(tmp_path / "o"), tokenizer=str(tmp_path), max_tokens=512))
    check_position_limit(CorpusConfig(tokenizer=str(tmp_path), max_tokens=64))


def test_truncated_documents_are_counted(messy):
    _, config, manifest, rows, _ = messy
    longer = [r for r in rows.values() if len(r["text"].encode()) + 1 > config.max_tokens]  # + 1: BOS
    assert longer and manifest["documents_truncated"] == len(longer)
    assert all(r["n_tokens"] == config.max_tokens for r in longer)


# ---- (9) atomic writes, full disk, collect --------------------------------------------------------------

def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_naming_the_file_and_a_rerun_completes(tmp_path, monkeypatch):
    config = CorpusConfig(out=str(tmp_path / "c"), generator=GeneratorConfig(concepts=("calm",), n_topics=2),
                          n_shards=2)
    before = build_corpus(config)
    manifest_bytes = (tmp_path / "c" / "manifest.json").read_bytes()
    monkeypatch.setattr(os, "fsync", _no_space)  # what a full disk does to the fileio write
    with pytest.raises(DiskFullError) as info:
        build_corpus(config)
    message = str(info.value)
    assert "\n" not in message and "no space left" in message and str(tmp_path / "c") in message
    assert (tmp_path / "c" / "manifest.json").read_bytes() == manifest_bytes
    assert not [p for p in (tmp_path / "c").rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    assert build_corpus(config) == before


def _responses(tmp_path, *rows):
    from emojax.corpus.prompts import write_prompts

    write_prompts(tmp_path / "prompts.jsonl", stories_per_prompt=2, concepts=("calm",), n_topics=2)
    prompts = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    good = " ".join(["She set the cup down and watched the light move across the floor."] * 8)
    path = tmp_path / "responses.jsonl"
    path.write_text("\n".join(json.dumps({"id": prompts[i]["id"], "response": good + extra}) for i, extra in rows))
    return path


def test_a_failing_collect_keeps_its_previous_output(tmp_path, monkeypatch):
    from emojax.corpus import generator
    from emojax.corpus.prompts import collect_responses

    out = tmp_path / "corpus.jsonl"
    assert collect_responses(_responses(tmp_path, (0, ""), (1, "")), out)["kept"] == 2
    previous = out.read_bytes()
    calls = []

    def breaks_on_the_second_story(text, concept):
        calls.append(text)
        if len(calls) == 2:
            raise RuntimeError("validator crashed")
        return []

    monkeypatch.setattr(generator, "validate_story", breaks_on_the_second_story)
    with pytest.raises(RuntimeError, match="validator crashed"):
        collect_responses(_responses(tmp_path, (0, " More."), (1, " More.")), out)
    monkeypatch.undo()
    assert out.read_bytes() == previous
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": "calm|000", "response": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl: cannot read"):
        collect_responses(tmp_path / "bad.jsonl", out)
    responses = _responses(tmp_path, (0, " More."))
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(DiskFullError, match="corpus.jsonl"):
        collect_responses(responses, out)
    monkeypatch.undo()
    assert out.read_bytes() == previous


def test_collect_rejects_a_prompt_answered_twice(tmp_path):
    from emojax.corpus.prompts import collect_responses

    result = collect_responses(_responses(tmp_path, (0, ""), (1, ""), (0, " Again.")), tmp_path / "c.jsonl")
    assert result["kept"] == 2
    (dup,) = result["rejected"]
    assert dup["line"] == 3 and "already answered on line 1" in dup["reason"]
    ids = [json.loads(x)["doc_id"] for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids))
