"""The activation store loses nothing and is never silently wrong: one writer at a time, absent files are errors
(never zeros), the model is identified by content, non-finite or over-long inputs stop the dump, a full disk
is one line, and a verify of an intact store changes no file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from dump_helpers import REPO, assert_same_store, child_env, dump_config, make_corpus, run_child

import emojax
from emojax.fileio import DiskFullError
from emojax.locks import LockedError
from emojax.models import random_model
from emojax.models.identity import model_identity
from emojax.models.presets import SHAPES
from emojax.store import ActivationStore, DumpError, StoreError, dump, reader
from emojax.store.arrays import write_error
from emojax.store.completeness import chunk_key
from emojax.store.corpus_shards import read_manifest, read_shard

QUIET = {"show_progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("durable") / "corpus")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("durable") / "acts"
    dump(dump_config(corpus, out), **QUIET)
    return out


def _copy(reference, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    return out


def _hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


HOLD_LOCK = """
import sys, time
from emojax.locks import WriterLock
with WriterLock(sys.argv[1], what="activation store"):
    print("READY", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_fails_at_once_naming_the_holder_and_readers_need_no_lock(corpus, reference, tmp_path):
    out = _copy(reference, tmp_path)
    first = sorted(p for p in (out / "shards").glob("*.json"))[0]
    first.unlink()  # one shard left to write, so the blocked dump would have work to do
    child = run_child(HOLD_LOCK, str(out))
    try:
        assert child.stdout.readline().strip() == "READY", child.stderr.read()
        with pytest.raises(LockedError, match=rf"{out}.*activation store.*pid {child.pid}"):
            dump(dump_config(corpus, out), **QUIET)
        assert not first.exists()  # nothing was written
        store = ActivationStore(str(out), allow_incomplete=True)  # a reader never takes the lock
        assert len(store.docs.rows) > 0
    finally:
        child.kill()
        child.wait()
    dump(dump_config(corpus, out), **QUIET)  # the kernel released the dead holder's lock
    assert_same_store(out, reference)


def test_verify_of_an_intact_store_changes_no_file(corpus, reference, tmp_path):
    out = _copy(reference, tmp_path)
    before = _hashes(out)
    assert ".emojax.lock" in before  # the dump's lock file stays, empty; reader and verify ignore it
    state = json.loads((out / "store.json").read_text())
    assert state["model_identity"]["id"] == model_identity("random:tiny")["id"]  # presets are recorded too
    logged = []
    dump(dump_config(corpus, out, verify=True), show_progress=False, log=logged.append)
    assert not any("rewritten" in line for line in logged)
    assert _hashes(out) == before


def test_a_deleted_shard_file_is_named_on_read_and_by_the_dump_and_verify_rewrites_it(corpus, reference, tmp_path,
                                                                                    monkeypatch):
    out = _copy(reference, tmp_path)
    victim = sorted(p for p in (out / "layer_02" / "tokens" / "c").rglob("*") if p.is_file())[1]
    key = str(victim.relative_to(out / "layer_02" / "tokens"))
    victim.unlink()
    listed = []
    original = reader.missing_files
    monkeypatch.setattr(reader, "missing_files", lambda *a: listed.append(a[1]) or original(*a))
    store = ActivationStore(str(out))
    assert listed == []  # opening lists nothing: it stays as fast as before
    assert len(store.docs.rows) == store.state["n_docs"]  # other arrays are intact and readable
    with pytest.raises(StoreError, match=rf"layer_02/tokens/{key} is missing .*complete"):
        store.tokens(2, 0, store.state["n_token_rows"])
    assert "layer_02/tokens" in listed
    with pytest.raises(StoreError, match=rf"layer_02/tokens/{key} is missing.*dump.verify=true"):
        dump(dump_config(corpus, out), **QUIET)
    logged = []
    dump(dump_config(corpus, out, verify=True), show_progress=False, log=logged.append)
    assert any("verify:" in line and f"layer_02/tokens/{key} is missing" in line for line in logged)
    assert_same_store(out, reference)


def test_allow_incomplete_exposes_only_completed_shards(corpus, reference, tmp_path):
    out = _copy(reference, tmp_path)
    state = json.loads((out / "store.json").read_text())
    lost = state["shards"][1]
    (out / "shards" / f"{lost['name']}.json").unlink()
    unit = dump_config(corpus, out).doc_chunk_rows  # the doc arrays' write unit
    for name in ("doc_split", "doc_label_id", "doc_n_tokens", "doc_token_start", "doc_n_pooled", "doc_shard_row"):
        for u in range(lost["doc_start"] // unit, -(-(lost["doc_start"] + lost["n_docs"]) // unit)):
            (out / name / chunk_key(u, 1)).unlink()  # as a dump killed before writing this shard leaves it
    state.update(complete=False, complete_shards=[s for s in state["complete_shards"] if s != lost["name"]])
    (out / "store.json").write_text(json.dumps(state))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(str(out))
    full, partial = ActivationStore(str(reference)), ActivationStore(str(out), allow_incomplete=True)
    keep = (full.docs.rows < lost["doc_start"]) | (full.docs.rows >= lost["doc_start"] + lost["n_docs"])
    np.testing.assert_array_equal(partial.docs.rows, full.docs.rows[keep])  # no unwritten row as a document
    np.testing.assert_array_equal(partial.docs.split, full.docs.split[keep])
    assert partial.doc_ids() == [d for d, k in zip(full.doc_ids(), keep) if k]


def test_the_store_records_the_model_by_content(corpus, tmp_path):
    model_a, model_b, moved = tmp_path / "a", tmp_path / "b", tmp_path / "moved"
    random_model(SHAPES["tiny"], seed=1).save(model_a)
    random_model(SHAPES["tiny"], seed=2).save(model_b)  # same shapes, different weights
    out = tmp_path / "acts"
    state = dump(dump_config(corpus, out, model=str(model_a)), **QUIET)
    assert state["model_identity"]["id"] == model_identity(model_a)["id"]
    with pytest.raises(DumpError, match=r"model: store has .*same shapes but different weights"):
        dump(dump_config(corpus, out, model=str(model_b)), **QUIET)
    shutil.copytree(model_a, moved)
    shutil.rmtree(model_a)
    before = _hashes(out)
    logged = []
    dump(dump_config(corpus, out, model=str(moved)), show_progress=False, log=logged.append)
    assert any("4 shard(s) already complete, skipped" in line for line in logged)
    assert _hashes(out) == before  # nothing recomputed, nothing rewritten


def _rare_token(corpus) -> tuple[int, set[str]]:
    """A token id that some but few documents hold, and those documents' ids."""
    holders: dict[int, set[str]] = {}
    manifest = read_manifest(str(corpus))
    shard = read_shard(str(corpus), manifest["shards"][0])
    for i, doc_id in enumerate(shard.doc_ids):
        for t in set(shard.tokens[shard.offsets[i]:shard.offsets[i + 1]].tolist()):
            holders.setdefault(t, set()).add(doc_id)
    token = min((t for t in holders if len(holders[t]) < len(shard.doc_ids)), key=lambda t: len(holders[t]))
    return token, holders[token]


def test_non_finite_activations_stop_the_dump_naming_the_documents_and_layer(corpus, tmp_path):
    token, holders = _rare_token(corpus)
    lm = emojax.load_model("random:tiny")
    embed = lm.params["embed"]
    embed.value = embed.value.at[token].set(jnp.nan)  # NaN from this token on, in the documents that hold it
    out = tmp_path / "acts"
    with pytest.raises(DumpError, match=r"non-finite activations .* at layer_01 .*for document\(s\) '") as e:
        dump(dump_config(corpus, out), lm=lm, **QUIET)
    named = re.findall(r"'([^']*)'", str(e.value).split("document(s) ")[1].split(";")[0])
    assert named and set(named) <= holders
    assert not list((out / "shards").glob("*.json"))  # nothing of the shard was recorded as complete


def test_a_document_longer_than_the_position_limit_is_refused_before_any_compute(corpus, tmp_path):
    lm = random_model(dataclasses.replace(SHAPES["tiny"], max_position_embeddings=100))
    out = tmp_path / "acts"
    with pytest.raises(DumpError, match=r"document '.*' has 1\d\d tokens.*max_position_embeddings=100"):
        dump(dump_config(corpus, out), lm=lm, **QUIET)
    assert not (out / "store.json").exists()
    assert SHAPES["gpt2"].position_limit == (1024, "n_positions")  # GPT-2: its learned position table


FULL_DISK_WRITER = """
import sys
import numpy as np
from emojax.fileio import DiskFullError
from emojax.store.state import KeyValueFolder
from emojax.store.writer import Writes, array_specs, create_arrays
root = sys.argv[1]
specs = array_specs(1 << 16, 16, 8, (1,), "float32", (1 << 16, 1 << 12), (16, 4))
arrays = create_arrays(root, specs)
writes = Writes(2, root)
try:
    values = np.random.default_rng(0).random((1 << 16, 8), np.float32)  # incompressible: 2 MB on 256 KB
    writes.write(arrays["layer_01/tokens"], 0, values, "layer_01/tokens")
    writes.wait_all()
except DiskFullError as e:
    print("ARRAY", e)
try:
    KeyValueFolder(root).write_json("store.json", {"pad": "x" * (1 << 20)})
except DiskFullError as e:
    print("JSON", e)
"""


def test_a_full_disk_is_a_one_line_disk_full_error_naming_the_file(tmp_path):
    error = write_error("/store/layer_01/tokens", ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/store/layer_01/tokens/c/0/0": Failed writing: '
        "\"/store/layer_01/tokens/c/0/0.__lock\": No space left on device [os_error_code='28']"))
    assert isinstance(error, DiskFullError) and "/store/layer_01/tokens" in str(error)
    small = tmp_path / "small"
    small.mkdir()
    mount = f"mount -t tmpfs -o size=256k tmpfs {small}"
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "sh", "-c", mount],
                                                     capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs in a user namespace here: only the message mapping was checked")
    script = f"{mount} && {sys.executable} -c {shlex.quote(FULL_DISK_WRITER)} {small}/acts"
    child = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=child_env(), cwd=str(REPO), text=True,
                           capture_output=True, timeout=120)
    assert child.returncode == 0, child.stderr
    lines = dict(line.split(" ", 1) for line in child.stdout.splitlines())
    assert sorted(lines) == ["ARRAY", "JSON"], child.stdout  # each error is one line
    assert "no space left" in lines["ARRAY"] and f"{small}/acts/layer_01/tokens" in lines["ARRAY"]
    assert "no space left" in lines["JSON"] and f"{small}/acts/store.json" in lines["JSON"]
