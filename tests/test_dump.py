"""The dump stage: stored values against a direct forward, metadata, resume, kill, multi-process, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import socket

import ml_dtypes
import numpy as np
import pytest
from dump_helpers import assert_same_store, config_args, dump_config, make_corpus, run_child, store_contents

import emojax
from emojax.cli import main
from emojax.store import ActivationStore, DumpError, StoreError, dump
from emojax.store.batches import batch_arrays, plan_batches
from emojax.store.corpus_shards import CorpusReadError, read_manifest, read_shard
from emojax.store.state import SPLIT_CODES
from emojax.tokenizer import ByteTokenizer

LAYERS = (1, 2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("dump") / "corpus")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted float32 dump on one device."""
    out = tmp_path_factory.mktemp("dump") / "acts"
    dump(dump_config(corpus, out), show_progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def lm():
    return emojax.load_model("random:tiny")


def _shards(corpus):
    manifest = read_manifest(str(corpus))
    return manifest, [read_shard(str(corpus), s) for s in manifest["shards"]]


def test_activations_equal_a_direct_forward(corpus, reference, lm):
    store = ActivationStore(str(reference))
    state = store.state
    manifest, shards = _shards(corpus)
    buckets = tuple(state["fingerprints"]["capture"]["buckets"])
    rows = dict(zip(buckets, state["fingerprints"]["capture"]["batch_rows"]))
    doc = 0
    for shard, _where in zip(shards, state["shards"]):
        for batch in plan_batches(shard.lengths, buckets, rows):
            tokens, mask = batch_arrays(batch, shard.tokens, shard.offsets)
            direct = lm(tokens, mask, capture=LAYERS, logits=False).hidden
            for r, d in enumerate(batch.docs):
                n = int(shard.lengths[d])
                for layer, h in zip(LAYERS, direct):
                    stored = store.document_tokens(layer, doc)
                    np.testing.assert_array_equal(stored, np.asarray(h)[r, :n])  # bitwise, float32 on CPU
                doc += 1
    assert doc == state["n_docs"] == manifest["documents_written"]
    # Bucket padding changes nothing: a document alone, unpadded, gives the same values.
    ids = store.doc_ids()
    for shard in shards:
        alone = shard.tokens[shard.offsets[0]:shard.offsets[1]][None]
        want = np.asarray(lm(alone, capture=(2,)).hidden[0][0])
        np.testing.assert_allclose(store.document_tokens(2, ids.index(shard.doc_ids[0])), want, atol=1e-5)


def test_a_steered_dump_stores_the_steered_forward(corpus, reference, lm, tmp_path):
    """The dump takes the forward's interventions (built for batch 1): each document's stored activations are
    the steered forward's, and the store records them, so an unsteered resume of it is refused."""
    from emojax.models import Interventions

    cfg = lm.config
    rng = np.random.default_rng(3)
    iv = (Interventions.empty(1, cfg.n_layers, cfg.d_model).add(rng.normal(size=cfg.d_model), layers=(1,))
          .ablate(rng.normal(size=cfg.d_model), layers=(2,)))
    out = tmp_path / "steered"
    dump(dump_config(corpus, out), show_progress=False, log=lambda *_: None, interventions=iv)
    store, plain = ActivationStore(str(out)), ActivationStore(str(reference))
    _, shards = _shards(corpus)
    ids = store.doc_ids()
    for shard in shards[:2]:
        alone = shard.tokens[shard.offsets[0]:shard.offsets[1]][None]
        want = lm(alone, capture=LAYERS, interventions=iv).hidden
        doc = ids.index(shard.doc_ids[0])
        for layer, h in zip(LAYERS, want):
            np.testing.assert_allclose(store.document_tokens(layer, doc), np.asarray(h[0]), atol=1e-5)
            assert not np.allclose(store.document_tokens(layer, doc), plain.document_tokens(layer, doc), atol=1e-3)
    assert store.state["fingerprints"]["interventions"] == iv.fingerprint()
    with pytest.raises(DumpError, match="interventions"):
        dump(dump_config(corpus, out), show_progress=False, log=lambda *_: None)
    with pytest.raises(DumpError, match="built for batch 1"):
        dump(dump_config(corpus, tmp_path / "other"), show_progress=False, log=lambda *_: None,
             interventions=Interventions.empty(2, cfg.n_layers, cfg.d_model))


def test_bfloat16_store_is_the_rounded_float32_one(corpus, reference, tmp_path):
    out = tmp_path / "bf16"
    dump(dump_config(corpus, out, dtype="bfloat16"), show_progress=False, log=lambda *_: None)
    f32, bf16 = ActivationStore(str(reference)), ActivationStore(str(out))
    assert bf16.dtype == "bfloat16"
    n = f32.state["n_token_rows"]
    for layer in LAYERS:
        want = f32.tokens(layer, 0, n).astype(ml_dtypes.bfloat16)
        got = bf16.tokens(layer, 0, n)
        assert got.dtype == ml_dtypes.bfloat16
        assert got.tobytes() == want.tobytes()
        rows = f32.docs.rows
        np.testing.assert_array_equal(bf16.pooled(layer, rows), f32.pooled(layer, rows))  # pooled stays float32


def test_pooled_means_equal_a_numpy_recomputation(reference):
    store = ActivationStore(str(reference))
    docs = store.docs
    pool_start = store.state["pool_start"]
    short = 0
    for layer in LAYERS:
        pooled = store.pooled(layer, docs.rows)
        for i in range(len(docs.rows)):
            acts = store.document_tokens(layer, i).astype(np.float64)
            start = int(docs.token_start[i])
            assert store.token_ids(start, start + 1)[0] == ByteTokenizer.BOS  # the byte tokenizer's BOS
            text = acts[1:]  # the BOS never enters a pooled mean
            used = text[pool_start:] if len(text) > pool_start else text
            short += layer == LAYERS[0] and len(text) <= pool_start
            assert docs.n_pooled[i] == len(used)
            np.testing.assert_allclose(pooled[i], used.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert 0 < short < len(docs.rows), "the corpus should hold documents on both sides of pool_start"
    assert store.state["short_docs"] == short


def test_metadata_maps_every_row_back_to_its_document(corpus, reference):
    store = ActivationStore(str(reference))
    manifest, shards = _shards(corpus)
    by_id = {}
    for shard in shards:
        for row, doc_id in enumerate(shard.doc_ids):
            by_id[doc_id] = (shard, row)
    ids = store.doc_ids()
    assert sorted(ids) == sorted(by_id) and len(set(ids)) == len(ids)  # every document once
    docs = store.docs
    names = {v: k for k, v in SPLIT_CODES.items()}
    for i, doc_id in enumerate(ids):
        shard, row = by_id[doc_id]
        ids_stored = store.token_ids(int(docs.token_start[i]), int(docs.token_start[i] + docs.n_tokens[i]))
        np.testing.assert_array_equal(ids_stored, shard.tokens[shard.offsets[row]:shard.offsets[row + 1]])
        assert docs.label_id[i] == shard.label_ids[row]
        assert names[int(docs.split[i])] == shard.splits[row]
    token_ids = store.token_ids(0, store.state["n_token_rows"])
    assert (token_ids >= 0).sum() == manifest["tokens_written"]  # gap rows are marked -1
    assert store.label_names[-1] == "neutral"
    for label in ("desperate", "calm"):
        for chunk in store.iter_pooled(1, split="train", labels=[label], chunk_docs=5):
            assert (chunk.label_id == store.label_ids[label]).all() and (chunk.split == SPLIT_CODES["train"]).all()
    with pytest.raises(StoreError, match="layer 7 is not in the store"):
        store.pooled(7, docs.rows[:2])


def test_rerun_skips_complete_shards_and_changes_nothing(corpus, reference, tmp_path):
    copy = tmp_path / "acts"
    shutil.copytree(reference, copy)
    before = store_contents(copy)
    logged = []
    dump(dump_config(corpus, copy), show_progress=False, log=logged.append)
    assert any("4 shard(s) already complete, skipped" in line for line in logged)
    after = store_contents(copy)
    for key in before:
        if isinstance(before[key], np.ndarray):
            assert before[key].tobytes() == after[key].tobytes()


def test_changed_settings_are_refused_with_what_differs(corpus, reference, tmp_path):
    copy = tmp_path / "acts"
    shutil.copytree(reference, copy)
    with pytest.raises(DumpError, match=r"(?s)capture.layers: store has \[1, 2\], this run has \[1\].*delete"):
        dump(dump_config(corpus, copy, layers=(1,)), show_progress=False, log=lambda *_: None)
    with pytest.raises(DumpError, match="model: store has"):
        dump(dump_config(corpus, copy, model="random:llama-56m"), show_progress=False, log=lambda *_: None)


KILL_CHILD = """
import sys, time
import jax
jax.config.update("jax_num_cpu_devices", 1)
from emojax.store import dumper, state, writer
from emojax.cli import main
marker_written, writes_after = [False], [0]
original_json, original_write = state.KeyValueFolder.write_json, writer.Writes.write
def write_json(self, key, value):
    original_json(self, key, value)
    marker_written[0] |= key.startswith("shards/")
def write(self, *args, **kw):
    original_write(self, *args, **kw)
    if marker_written[0]:
        writes_after[0] += 1
        if writes_after[0] == 3:  # a shard is complete and the next one is half written: wait for SIGKILL
            print("READY", flush=True)
            time.sleep(600)
state.KeyValueFolder.write_json, writer.Writes.write = write_json, write
sys.exit(main(["dump", "--quiet", *sys.argv[1:]]))
"""


def test_sigkill_during_a_shard_then_resume_is_bitwise_identical(corpus, reference, tmp_path):
    out = tmp_path / "acts"
    config = dump_config(corpus, out)
    child = run_child(KILL_CHILD, *config_args(config))
    line = child.stdout.readline()
    assert line.strip() == "READY", child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.wait()
    complete = sorted(p.name for p in (out / "shards").glob("*.json"))
    state = json.loads((out / "store.json").read_text())
    assert 1 <= len(complete) < len(state["shards"]) and not state["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(str(out))
    logged = []
    dump(config, show_progress=False, log=logged.append)
    assert any(f"{len(complete)} shard(s) already complete, skipped" in line for line in logged)
    assert_same_store(out, reference)


MULTI_CHILD = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 1)
from emojax.cli import main
port, pid = sys.argv[1], sys.argv[2]
sys.exit(main(["dump", "--quiet", "--coordinator", f"localhost:{port}", "--num-processes", "2",
               "--process-id", pid, "--cpu-collectives", "gloo", *sys.argv[3:]]))
"""


def test_two_processes_write_the_same_store_as_one(corpus, reference, tmp_path):
    out = tmp_path / "acts"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    args = config_args(dump_config(corpus, out))
    children = [run_child(MULTI_CHILD, port, str(pid), *args) for pid in (0, 1)]
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
    records = [json.loads(p.read_text()) for p in (out / "summary").glob("process-*.json")]
    assert sorted(r["process"] for r in records) == [0, 1] and all(r["shards_written"] == 2 for r in records)
    assert_same_store(out, reference)


def test_a_corpus_from_another_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    other = make_corpus(tmp_path / "corpus", tokenizer=str(tmp_path / "tokenizer.json"), n_shards=1)
    with pytest.raises(DumpError, match=r"corpus was tokenized with .*tokenizer.json.*rebuild the corpus"):
        dump(dump_config(other, tmp_path / "acts"), show_progress=False, log=lambda *_: None)
    assert main(["dump", f"corpus={other}", f"out={tmp_path / 'acts'}", "model=random:tiny", "--quiet"]) == 2


def test_an_unreadable_shard_stops_cleanly_and_finished_shards_survive(corpus, reference, tmp_path):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    manifest = read_manifest(str(broken))
    victim = broken / "shards" / manifest["shards"][2]["name"]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    out = tmp_path / "acts"
    with pytest.raises(CorpusReadError, match=manifest["shards"][2]["name"]):
        dump(dump_config(broken, out), show_progress=False, log=lambda *_: None)
    done = sorted(p.name for p in (out / "shards").glob("*.json"))
    assert done == [s["name"] + ".json" for s in manifest["shards"][:2]]
    victim.write_bytes(good)
    logged = []
    dump(dump_config(broken, out), show_progress=False, log=logged.append)
    assert any("2 shard(s) already complete, skipped" in line for line in logged)
    assert_same_store(out, reference)


FULL_DISK_CHILD = """
import resource, signal, sys
import jax
jax.config.update("jax_num_cpu_devices", 1)
from emojax.cli import main
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file at the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["dump", "--quiet", *sys.argv[2:]]))
"""


def test_a_full_disk_fails_cleanly_and_a_rerun_completes(corpus, tmp_path):
    # One token write unit holds a whole shard, so each shard writes one file per layer whose size grows with
    # the shard. With the shards listed smallest first (the dump follows the manifest's order), a file-size
    # limit between the first two shards' sizes lets the first finish and makes the second fail mid-shard.
    ordered = tmp_path / "corpus"
    shutil.copytree(corpus, ordered)
    manifest = json.loads((ordered / "manifest.json").read_text())
    manifest["shards"].sort(key=lambda s: s["tokens"])
    (ordered / "manifest.json").write_text(json.dumps(manifest))
    config = dump_config(ordered, tmp_path / "reference", token_chunk_rows=8192, token_read_rows=512)
    dump(config, show_progress=False, log=lambda *_: None)
    sizes = [(tmp_path / "reference" / "layer_01" / "tokens" / "c" / str(i) / "0").stat().st_size for i in range(4)]
    assert sizes[0] < sizes[1]
    limit = (sizes[0] + sizes[1]) // 2
    out = tmp_path / "acts"
    child = run_child(FULL_DISK_CHILD, str(limit), *config_args(dataclasses.replace(config, out=str(out))))
    _, err = child.communicate(timeout=300)
    assert child.returncode == 2, err
    assert "emojax: error:" in err and "is the disk full" in err and "layer_01/tokens" in err
    state = json.loads((out / "store.json").read_text())  # intact, readable
    done = sorted(p.name for p in (out / "shards").glob("*.json"))
    assert done == [manifest["shards"][0]["name"] + ".json"] and not state["complete"]
    dump(dataclasses.replace(config, out=str(out)), show_progress=False, log=lambda *_: None)
    assert_same_store(out, tmp_path / "reference")


def test_a_corrupted_chunk_is_reported_on_read_and_verify_rewrites_it(corpus, reference, tmp_path):
    out = tmp_path / "acts"
    shutil.copytree(reference, out)
    victim = sorted(p for p in (out / "layer_02" / "tokens" / "c").rglob("*") if p.is_file())[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    store = ActivationStore(str(out))
    with pytest.raises(StoreError, match=r"layer_02/tokens: rows .* cannot be read .*corrupted"):
        store.tokens(2, 0, store.state["n_token_rows"])
    logged = []
    dump(dump_config(corpus, out, verify=True), show_progress=False, log=logged.append)
    assert any("verify:" in line and "will be rewritten" in line for line in logged)
    assert_same_store(out, reference)


def test_token_batches_are_seeded_resumable_and_drawn_from_the_split(reference):
    store = ActivationStore(str(reference))
    docs = store.docs
    train = store.select("train")
    train_rows = np.concatenate([np.arange(docs.token_start[i] + 1, docs.token_start[i] + docs.n_tokens[i])
                                 for i in train])  # the BOS row of every document never enters SAE training

    def take(n, **kw):
        it = iter(store.token_batches(1, batch_size=64, seed=3, buffer_chunks=3, **kw))
        return [next(it) for _ in range(n)]

    first = take(40)
    again = take(40)
    assert all((a.rows == b.rows).all() and a.acts.tobytes() == b.acts.tobytes() for a, b in zip(first, again))
    resumed = take(5, start_batch=23)
    assert [b.index for b in resumed] == list(range(23, 28))
    assert all((a.rows == b.rows).all() for a, b in zip(first[23:28], resumed))
    rows = np.concatenate([b.rows for b in first])
    assert np.isin(rows, train_rows).all()
    assert not np.isin(rows, docs.token_start).any()
    per_epoch = len(train_rows) // 64
    epoch_rows = rows[: min(per_epoch, 20) * 64]
    assert len(np.unique(epoch_rows)) == len(epoch_rows)  # no row twice within an epoch
    tokens = store.tokens(1, 0, store.state["n_token_rows"])
    np.testing.assert_array_equal(first[0].acts, tokens[first[0].rows])
    other = iter(store.token_batches(1, batch_size=64, seed=4, buffer_chunks=3))
    assert not (next(other).rows == first[0].rows).all()


def test_cli_dump_reads_a_config_file_and_names_bad_keys(corpus, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"dump:\n  corpus: {corpus}\n  out: {tmp_path / 'acts'}\n  model: random:tiny\n"
                      "  layers: [2]\n  buckets: [200]\n  mesh: [1, 1, 1]\n")
    assert main(["dump", "--config", str(config), "--quiet"]) == 0
    store = ActivationStore(str(tmp_path / "acts"))
    assert store.layers == (2,) and store.dtype == "bfloat16"
    assert "tokens/s" in capsys.readouterr().err  # log lines go to stderr (emojax.progress)
    config.write_text("dump:\n  layer: [2]\n")
    assert main(["dump", "--config", str(config)]) == 2
    assert "unknown key(s) ['dump.layer']" in capsys.readouterr().err
