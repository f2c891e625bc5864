"""`dump`: corpus shards -> bucketed batches -> jitted, mesh-sharded forward -> TensorStore arrays.

Per captured layer the store holds token-level activations [N_tokens, D] (bf16 by default) and per-document
means [N_docs, D] (float32, positions >= pool_start, computed on device), plus token ids and per-document
metadata. Host batch preparation, device compute and array writes overlap: batch i is dispatched before the
results of batch i - 1 are copied out and handed to TensorStore, with a bounded number of writes in flight.

A corpus shard counts as complete only once every write of it has committed and its record
(shards/NAME.json) exists; a rerun skips complete shards and rewrites the others. Under jax.distributed each
process takes the shards whose index is its process index modulo the process count; their row ranges are
disjoint and write-unit aligned (layout.py), so processes share one store without coordination.

One dump at a time writes a store (a WriterLock on its folder, see `_writer_lock`). store.json records the
model by content (emojax.models.identity): a moved checkpoint resumes, another model is refused. Nothing wrong
is written silently: documents longer than the model's position limit stop the dump before any compute, every
batch's activations are checked finite on device, and a completed shard's absent file is an error (or, with
verify, a shard to rewrite), never zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from emojax.locks import writer_lock
from emojax.models import load_model, make_mesh
from emojax.models.identity import describe_difference, model_identity, same_model
from emojax.models.sharding import batch_multiple
from emojax.progress import fmt, log, progress_bar
from emojax.store import corpus_shards
from emojax.store.batches import batch_arrays, plan_batches, rows_per_bucket
from emojax.store.checks import DumpError, check_positions, check_tokenizer, refuse_non_finite, refuse_too_long
from emojax.store.completeness import damaged_shards
from emojax.store.config import DumpConfig, default_buckets, default_layers
from emojax.store.layout import ShardRange, StoreLayout, plan_layout
from emojax.store.state import (
    SPLIT_CODES,
    STORE_FORMAT,
    KeyValueFolder,
    checkpoint_fingerprint,
    corpus_fingerprint,
    describe_mismatch,
)
from emojax.store.step import Step
from emojax.store.writer import (
    DOC_ARRAYS,
    TOKEN_ID_GAP,
    ChunkedRows,
    Writes,
    array_specs,
    create_arrays,
    layer_name,
    open_arrays,
)


def dump(config: DumpConfig, show_progress: bool = True, log=log, lm=None, interventions=None) -> dict:
    """Runs (or resumes) the dump stage; returns store.json's content.

    `interventions`: an emojax.models.Interventions built for batch 1 (adds, ablations, an SAE clamp; no patch),
    applied to every document: a store of the steered model's activations (recorded in its fingerprint).

    `lm`: an already loaded model to use instead of loading config.model (its compiled forwards are reused,
    e.g. by a benchmark that warms up first); config.model still names it in store.json when `lm` has no
    checkpoint folder to identify it by.
    """
    with _writer_lock(config.out):  # before the model loads: a second writer fails at once
        return _dump(config, show_progress, log, lm, interventions)


def _writer_lock(out: str):
    """The store's WriterLock, for the whole write (verify included); readers never take it.

    Object stores (gs://, s3://, ...) are skipped: fcntl locks exist only on a local file system, and those
    stores have none to take. Under jax.distributed the processes of one dump write the same store by design
    (disjoint shards), so only process 0 takes the lock: any second dump has a process 0 too and fails at once,
    and its other processes never write, since they wait at the first barrier for their process 0.
    """
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return writer_lock(out, what="activation store")


def _dump(config: DumpConfig, show_progress: bool, log, lm, interventions) -> dict:
    manifest = corpus_shards.read_manifest(config.corpus)
    if lm is None:
        lm = load_model(config.model, dtype=config.model_dtype, mesh=_local_mesh(config.mesh),
                        attention=config.attention)
    mesh = lm.mesh
    if interventions is not None:
        if interventions.batch != 1 or interventions.patch is not None:
            raise DumpError("a dump's interventions are built for batch 1 (they apply to every document) and "
                            "cannot patch (a patch holds values for given tokens)")
        interventions.check(lm.config.n_layers, lm.config.d_model, 1)
    tokenizer = check_tokenizer(config, lm, manifest)
    check_positions(config, lm, manifest)
    L = lm.config.n_layers
    layers = tuple(config.layers) or default_layers(L)
    bad = [i for i in layers if not 0 <= i <= L]
    if bad or len(set(layers)) != len(layers):
        raise DumpError(f"layers {list(layers)}: each must be a distinct residual index in 0..{L} "
                        "(0 = embeddings, i = output of layer i - 1)")
    layers = tuple(sorted(layers))
    buckets = tuple(config.buckets) or default_buckets(int(manifest["max_tokens"]))
    rows = rows_per_bucket(buckets, config.tokens_per_batch, batch_multiple(mesh))
    layout = plan_layout(manifest, config.token_chunk_rows, config.doc_chunk_rows)
    specs = array_specs(layout.n_token_rows, layout.n_doc_rows, lm.config.d_model, layers, config.dtype,
                        (config.token_chunk_rows, config.token_read_rows),
                        (config.doc_chunk_rows, config.doc_read_rows))
    identity = getattr(lm, "identity", None) or model_identity(config.model)
    fingerprints = {  # the model by content: its identity's id (path-free), compared as model_identity
        "model": identity["id"],
        "tokenizer": tokenizer.fingerprint,
        "corpus": corpus_fingerprint(manifest),
        "capture": {"layers": list(layers), "dtype": config.dtype, "model_dtype": config.model_dtype,
                    "pool_start": config.pool_start, "buckets": list(buckets), "batch_rows": list(rows.values()),
                    "token_chunk_rows": config.token_chunk_rows, "token_read_rows": config.token_read_rows,
                    "doc_chunk_rows": config.doc_chunk_rows, "doc_read_rows": config.doc_read_rows,
                    "pooling": {"counts": "real tokens", "bos_id_left_out": tokenizer.bos_id}},
    }
    if interventions is not None:
        fingerprints["interventions"] = interventions.fingerprint()
    folder = KeyValueFolder(config.out)
    state = _open_or_create(folder, config, fingerprints, identity, layout, layers, lm, manifest, specs)
    arrays = open_arrays(config.out, specs)

    done = folder.recorded_shards()
    rank, world = jax.process_index(), jax.process_count()
    complete = [s for s in layout.shards if s.index % world == rank and s.name in done]
    damaged = damaged_shards(config.out, config.verify, complete, arrays, specs, log)
    for name in damaged:
        folder.delete(f"shards/{name}.json")
        done.discard(name)
    if damaged and world == 1:  # store.json no longer lists them (multi-process: process 0 in _finish)
        state = {**state, "complete_shards": sorted(set(state["complete_shards"]) - damaged), "complete": False}
        folder.write_json("store.json", state)
    mine = [s for s in layout.shards if s.index % world == rank and s.name not in done]
    skipped = [s.name for s in layout.shards if s.index % world == rank and s.name in done]
    if skipped:
        log(f"dump: {len(skipped)} shard(s) already complete, skipped: {', '.join(skipped)}")

    step = Step(lm, layers, config.pool_start, config.dtype, interventions, tokenizer.bos_id)
    writes = Writes(config.writes_in_flight, config.out)
    counted = {"tokens": 0, "documents": 0}
    started = time.perf_counter()
    with progress_bar("dump", sum(s.n_tokens for s in mine), enabled=show_progress) as update, \
            ThreadPoolExecutor(max_workers=1) as reader:

        def advance(tokens: int, documents: int) -> None:  # one collected batch: the counts and rates so far
            counted["tokens"] += tokens
            counted["documents"] += documents
            seconds = max(time.perf_counter() - started, 1e-9)
            update(advance=tokens, status=f"{fmt(round(counted['tokens'] / seconds))} tok/s  "
                                          f"{fmt(writes.bytes_written / 1e6 / seconds)} MB/s")

        infos = {s["name"]: s for s in manifest["shards"]}
        upcoming = deque(reader.submit(corpus_shards.read_shard, config.corpus, infos[s.name]) for s in mine[:1])
        for k, shard_range in enumerate(mine):
            update(description=f"dump shard {k + 1}/{len(mine)}")
            shard = upcoming.popleft().result()
            if k + 1 < len(mine):  # read the next shard while this one runs
                upcoming.append(reader.submit(corpus_shards.read_shard, config.corpus, infos[mine[k + 1].name]))
            record = _dump_shard(shard, shard_range, arrays, layers, buckets, rows, step, writes, advance,
                                 lm.config)
            writes.wait_all()  # every array write of the shard has committed: only now is it complete
            folder.write_json(f"shards/{shard.name}.json", record)
            if world == 1:
                state["complete_shards"] = sorted([*state["complete_shards"], shard.name])
                folder.write_json("store.json", state)
    seconds = time.perf_counter() - started
    summary = {**counted, "seconds": round(seconds, 3), "tokens_per_s": counted["tokens"] / max(seconds, 1e-9),
               "mb_written": writes.bytes_written / 1e6, "mb_per_s": writes.bytes_written / 1e6 / max(seconds, 1e-9),
               "shards_written": len(mine), "shards_skipped": len(skipped), "process": rank}
    summary_key = f"summary/process-{rank:03d}.json"
    if mine or folder.read_json(summary_key) is None:  # a run that wrote nothing leaves the last one's summary
        folder.write_json(summary_key, summary)
    state = _finish(folder, state, layout, world)
    log(f"dump: {fmt(summary['tokens'])} tokens, {fmt(summary['documents'])} documents from {len(mine)} shard(s) in "
        f"{fmt(seconds)} s: {fmt(round(summary['tokens_per_s']))} tokens/s, {fmt(summary['mb_per_s'])} MB/s written"
        f"{'' if state['complete'] else ' (other processes still writing)'}")
    return state


def _local_mesh(shape: tuple[int, ...]):
    devices = jax.local_devices()
    return make_mesh(tuple(shape) if shape else (len(devices), 1, 1), devices)


def _open_or_create(folder: KeyValueFolder, config: DumpConfig, fingerprints: dict, identity: dict,
                    layout: StoreLayout, layers: tuple[int, ...], lm, manifest: dict, specs) -> dict:
    state = folder.read_json("store.json") if jax.process_index() == 0 else None
    if jax.process_index() == 0 and state is None:
        create_arrays(config.out, specs)
        state = {
            "format": STORE_FORMAT, "fingerprints": fingerprints, "model_identity": identity, "layers": list(layers),
            "d_model": lm.config.d_model, "n_layers": lm.config.n_layers, "dtype": config.dtype,
            "pool_start": config.pool_start, "model": config.model, "corpus": config.corpus,
            "label_ids": manifest["label_ids"], "split_codes": SPLIT_CODES,
            "n_doc_rows": layout.n_doc_rows, "n_token_rows": layout.n_token_rows,
            "n_docs": layout.n_docs, "n_tokens": layout.n_tokens,
            "shards": [dataclasses.asdict(s) for s in layout.shards],
            "complete_shards": [], "complete": False,
        }
        folder.write_json("store.json", state)  # written last: arrays without it are replaced on a rerun
    _barrier("emojax-dump-created")
    if state is None:
        state = folder.read_json("store.json")
    if state.get("format") != STORE_FORMAT:
        raise DumpError(f"{config.out}/store.json: not an emojax activation store ({state.get('format')!r})")
    stored = dict(state["fingerprints"])
    diff = _model_difference(stored.pop("model", None), state, identity, config, lm)
    diff += describe_mismatch(stored, {k: v for k, v in fingerprints.items() if k != "model"})
    if diff:
        raise DumpError(f"{config.out}: the existing store was written with other inputs or settings:\n  "
                        + "\n  ".join(diff)
                        + f"\nTo start fresh, delete {config.out} or set dump.out to a new location")
    return state


def _model_difference(legacy: str | None, state: dict, identity: dict, config: DumpConfig, lm) -> list[str]:
    """[] when the store's model is this run's by content (wherever either lives), else the line saying how."""
    stored = state.get("model_identity")
    if stored is not None:
        if same_model(stored, identity):
            return []
        how = describe_difference(stored, identity)
    else:  # a store from before model identities: only its path-and-header fingerprint can be compared
        if legacy == checkpoint_fingerprint(lm.source, lm.hf_config or dataclasses.asdict(lm.config)):
            return []
        how = "the store predates content identities, so a moved checkpoint counts as another model"
    return [f"model: store has {state.get('model')!r}, this run has {config.model!r} ({how})"]


def _finish(folder: KeyValueFolder, state: dict, layout: StoreLayout, world: int) -> dict:
    """Records the complete shards in store.json (process 0, once every process is done writing)."""
    _barrier("emojax-dump-finished")
    if jax.process_index() == 0:
        done = folder.recorded_shards()
        records = [folder.read_json(f"shards/{s.name}.json") for s in layout.shards if s.name in done]
        new = {**state, "complete_shards": sorted(done & {s.name for s in layout.shards}),
               "short_docs": sum(r["short_docs"] for r in records)}
        new["complete"] = len(new["complete_shards"]) == len(layout.shards)
        if new != state:  # a rerun over a complete store (verify included) rewrites no file
            folder.write_json("store.json", new)
        state = new
    _barrier("emojax-dump-recorded")
    return folder.read_json("store.json") if jax.process_index() else state


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _dump_shard(shard: corpus_shards.CorpusShard, where: ShardRange, arrays: dict, layers: tuple[int, ...],
                buckets: tuple[int, ...], rows: dict[int, int], step: Step, writes: Writes,
                advance: Callable[[int, int], None], model_config) -> dict:
    """Writes one corpus shard's rows, calling advance(tokens, documents) per batch collected; returns its
    completion record (written by the caller after commit)."""
    vocab_size = model_config.vocab_size
    refuse_too_long(shard.name, shard.doc_ids, shard.lengths, model_config)
    if shard.tokens.size and (shard.tokens.min() < 0 or shard.tokens.max() >= vocab_size):
        bad = int(np.searchsorted(shard.offsets, int(np.argmax((shard.tokens < 0) | (shard.tokens >= vocab_size))),
                                  side="right") - 1)
        raise DumpError(f"{shard.name}: document {shard.doc_ids[bad]!r} has token ids outside the model's "
                        f"vocabulary [0, {vocab_size}); the corpus was built with another tokenizer")
    batches = plan_batches(shard.lengths, buckets, rows, shard.name)
    order = np.concatenate([b.docs for b in batches]) if batches else np.zeros((0,), np.int64)
    n_docs = len(order)
    lengths = shard.lengths[order]
    token_rows = {layer: ChunkedRows(arrays[f"{layer_name(layer)}/tokens"], where.token_start,
                                     arrays[f"{layer_name(layer)}/tokens"].chunk_layout.write_chunk.shape[0],
                                     writes, f"{layer_name(layer)}/tokens") for layer in layers}
    pooled = {layer: np.zeros((n_docs, arrays[f"{layer_name(layer)}/pooled"].shape[1]), np.float32)
              for layer in layers}
    n_pooled = np.zeros((n_docs,), np.int32)

    pending: deque = deque()
    position = 0  # documents of the shard already handed to the writers, in store order

    def collect():
        nonlocal position
        batch, mask, (tokens_out, pooled_out, count, finite) = pending.popleft()
        n = len(batch.docs)
        finite = np.asarray(finite)[:, :n]
        if not finite.all():
            refuse_non_finite(shard, batch.docs, layers, finite)
        real = mask[:n].astype(bool)
        for layer, t, p in zip(layers, tokens_out, pooled_out):
            token_rows[layer].append(np.asarray(t)[:n][real])  # pad positions never reach the store
            pooled[layer][position:position + n] = np.asarray(p)[:n]
        n_pooled[position:position + n] = np.asarray(count)[:n]
        position += n
        advance(int(real.sum()), n)

    for batch in batches:
        tokens, mask = batch_arrays(batch, shard.tokens, shard.offsets)
        pending.append((batch, mask, step(tokens, mask)))  # dispatched asynchronously
        if len(pending) > 1:
            collect()  # the previous batch, while this one computes
    while pending:
        collect()
    for rows_of_layer in token_rows.values():
        rows_of_layer.close()

    _write_doc_rows(shard, where, arrays, layers, order, lengths, pooled, n_pooled, writes)
    return {"name": shard.name, "documents": n_docs, "tokens": int(lengths.sum()),
            "short_docs": int((_text_lengths(shard, order, step.bos_id) <= step.pool_start).sum()),
            "doc_ids": [shard.doc_ids[i] for i in order]}


def _text_lengths(shard: corpus_shards.CorpusShard, order: np.ndarray, bos_id: int | None) -> np.ndarray:
    """Each document's token count without its BOS (what the pooling offset counts)."""
    lengths = shard.lengths[order].astype(np.int64)
    if bos_id is None or not len(order):
        return lengths
    first = shard.tokens[np.minimum(shard.offsets[order], max(len(shard.tokens) - 1, 0))]
    return lengths - ((lengths > 0) & (first == bos_id))


def _write_doc_rows(shard, where: ShardRange, arrays: dict, layers, order, lengths, pooled, n_pooled,
                    writes: Writes) -> None:
    n_docs = len(order)
    doc_unit = arrays["doc_split"].chunk_layout.write_chunk.shape[0]
    token_unit = arrays["token_ids"].chunk_layout.write_chunk.shape[0]
    n_doc_rows = -(-n_docs // doc_unit) * doc_unit
    n_token_rows = -(-int(lengths.sum()) // token_unit) * token_unit
    values = {name: np.full((n_doc_rows,), gap, dtype) for name, (dtype, gap) in DOC_ARRAYS.items()}
    starts = where.token_start + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    values["doc_token_start"][:n_docs] = starts if n_docs else []
    values["doc_n_tokens"][:n_docs] = lengths
    values["doc_n_pooled"][:n_docs] = n_pooled
    values["doc_label_id"][:n_docs] = shard.label_ids[order]
    values["doc_split"][:n_docs] = [SPLIT_CODES[shard.splits[i]] for i in order]
    values["doc_shard_row"][:n_docs] = order
    for name, v in values.items():
        writes.write(arrays[name], where.doc_start, v, name)
    token_ids = np.full((n_token_rows,), TOKEN_ID_GAP, np.int32)
    if n_docs:
        token_ids[:int(lengths.sum())] = np.concatenate([shard.tokens[shard.offsets[i]:shard.offsets[i + 1]]
                                                          for i in order])
    writes.write(arrays["token_ids"], where.token_start, token_ids, "token_ids")
    for layer in layers:
        block = np.zeros((n_doc_rows, pooled[layer].shape[1]), np.float32)
        block[:n_docs] = pooled[layer]
        writes.write(arrays[f"{layer_name(layer)}/pooled"], where.doc_start, block, f"{layer_name(layer)}/pooled")
