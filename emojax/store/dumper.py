"""`dump`: corpus shards -> bucketed batches -> jitted, mesh-sharded forward -> TensorStore arrays.

Per captured layer the store holds token-level activations [N_tokens, D] (bf16 by default) and per-document
means [N_docs, D] (float32, positions >= pool_start, computed on device), plus token ids and per-document
metadata. Host batch preparation, device compute and array writes overlap: batch i is dispatched before the
results of batch i - 1 are copied out and handed to TensorStore, with a bounded number of writes in flight.

A corpus shard counts as complete only once every write of it has committed and its record
(shards/NAME.json) exists; a rerun skips complete shards and rewrites the others. Under jax.distributed each
process takes the shards whose index is its process index modulo the process count; their row ranges are
disjoint and write-unit aligned (layout.py), so processes share one store without coordination.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from emojax.errors import EmojaxError
from emojax.models import load_model, make_mesh
from emojax.models.sharding import batch_multiple
from emojax.store import corpus_shards
from emojax.store.arrays import StoreError, read_rows
from emojax.store.batches import batch_arrays, plan_batches, rows_per_bucket
from emojax.store.config import DumpConfig, default_buckets, default_layers
from emojax.store.layout import ShardRange, StoreLayout, plan_layout
from emojax.store.progress import DumpProgress
from emojax.store.state import (
    SPLIT_CODES,
    STORE_FORMAT,
    KeyValueFolder,
    checkpoint_fingerprint,
    corpus_fingerprint,
    describe_mismatch,
)
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
from emojax.tokenizer import load_tokenizer


class DumpError(EmojaxError):
    """A dump that cannot start or continue (mismatched store, tokenizer or settings)."""


def dump(config: DumpConfig, show_progress: bool = True, log=print, lm=None) -> dict:
    """Runs (or resumes) the dump stage; returns store.json's content.

    `lm`: an already loaded model to use instead of loading config.model (its compiled forwards are reused,
    e.g. by a benchmark that warms up first); config.model still names it in the fingerprint.
    """
    manifest = corpus_shards.read_manifest(config.corpus)
    if lm is None:
        lm = load_model(config.model, dtype=config.model_dtype, mesh=_local_mesh(config.mesh))
    mesh = lm.mesh
    tokenizer_sha = _check_tokenizer(config, lm, manifest)
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
    fingerprints = {
        "model": checkpoint_fingerprint(lm.source, lm.hf_config or dataclasses.asdict(lm.config)),
        "tokenizer": tokenizer_sha,
        "corpus": corpus_fingerprint(manifest),
        "capture": {"layers": list(layers), "dtype": config.dtype, "model_dtype": config.model_dtype,
                    "pool_start": config.pool_start, "buckets": list(buckets), "batch_rows": list(rows.values()),
                    "token_chunk_rows": config.token_chunk_rows, "token_read_rows": config.token_read_rows,
                    "doc_chunk_rows": config.doc_chunk_rows, "doc_read_rows": config.doc_read_rows},
    }
    folder = KeyValueFolder(config.out)
    state = _open_or_create(folder, config, fingerprints, layout, layers, lm, manifest, specs)
    arrays = open_arrays(config.out, specs)

    done = _complete_shards(folder)
    rank, world = jax.process_index(), jax.process_count()
    if config.verify:
        for s in layout.shards:
            if s.index % world == rank and s.name in done and not _readable(s, arrays, specs, log):
                folder.delete(f"shards/{s.name}.json")
                done.discard(s.name)
    mine = [s for s in layout.shards if s.index % world == rank and s.name not in done]
    skipped = [s.name for s in layout.shards if s.index % world == rank and s.name in done]
    if skipped:
        log(f"dump: {len(skipped)} shard(s) already complete, skipped: {', '.join(skipped)}")

    step = _Step(lm, layers, config.pool_start, config.dtype)
    progress = DumpProgress(sum(s.n_tokens for s in mine), len(mine), enabled=show_progress)
    writes = Writes(config.writes_in_flight)
    started = time.perf_counter()
    with progress, ThreadPoolExecutor(max_workers=1) as reader:
        infos = {s["name"]: s for s in manifest["shards"]}
        upcoming = deque(reader.submit(corpus_shards.read_shard, config.corpus, infos[s.name]) for s in mine[:1])
        for k, shard_range in enumerate(mine):
            shard = upcoming.popleft().result()
            if k + 1 < len(mine):  # read the next shard while this one runs
                upcoming.append(reader.submit(corpus_shards.read_shard, config.corpus, infos[mine[k + 1].name]))
            record = _dump_shard(shard, shard_range, arrays, layers, buckets, rows, step, writes, progress,
                                 lm.config.vocab_size)
            writes.wait_all()  # every array write of the shard has committed: only now is it complete
            folder.write_json(f"shards/{shard.name}.json", record)
            if world == 1:
                state["complete_shards"] = sorted([*state["complete_shards"], shard.name])
                folder.write_json("store.json", state)
            progress.shard_done()
    seconds = time.perf_counter() - started
    state = _finish(folder, state, layout, world)
    summary = {"tokens": progress.tokens, "documents": progress.documents, "seconds": round(seconds, 3),
               "tokens_per_s": progress.tokens / max(seconds, 1e-9),
               "mb_written": writes.bytes_written / 1e6, "mb_per_s": writes.bytes_written / 1e6 / max(seconds, 1e-9),
               "shards_written": len(mine), "shards_skipped": len(skipped), "process": rank}
    folder.write_json(f"summary/process-{rank:03d}.json", summary)
    log(f"dump: {summary['tokens']:,} tokens, {summary['documents']:,} documents from {len(mine)} shard(s) in "
        f"{seconds:.1f} s: {summary['tokens_per_s']:,.0f} tokens/s, {summary['mb_per_s']:,.1f} MB/s written"
        f"{'' if state['complete'] else ' (other processes still writing)'}")
    return state


def _local_mesh(shape: tuple[int, ...]):
    devices = jax.local_devices()
    return make_mesh(tuple(shape) if shape else (len(devices), 1, 1), devices)


def _check_tokenizer(config: DumpConfig, lm, manifest: dict) -> str:
    """The corpus must have been tokenized by the tokenizer this model reads."""
    if config.tokenizer:
        tokenizer, name = load_tokenizer(config.tokenizer), config.tokenizer
    elif lm.tokenizer is not None:
        tokenizer, name = lm.tokenizer, f"the tokenizer.json of {lm.source}"
    else:
        tokenizer, name = load_tokenizer("byte"), "byte (the default for a model without tokenizer.json)"
    if tokenizer.fingerprint != manifest["tokenizer_sha256"]:
        raise DumpError(f"{corpus_shards.join(config.corpus, 'manifest.json')}: the corpus was tokenized with "
                        f"{manifest.get('tokenizer')!r} (sha256 {manifest['tokenizer_sha256'][:12]}), but the dump "
                        f"uses {name} (sha256 {tokenizer.fingerprint[:12]}); rebuild the corpus with "
                        "corpus.tokenizer set to the model's tokenizer, or set dump.tokenizer")
    return tokenizer.fingerprint


def _open_or_create(folder: KeyValueFolder, config: DumpConfig, fingerprints: dict, layout: StoreLayout,
                    layers: tuple[int, ...], lm, manifest: dict, specs) -> dict:
    state = folder.read_json("store.json") if jax.process_index() == 0 else None
    if jax.process_index() == 0 and state is None:
        create_arrays(config.out, specs)
        state = {
            "format": STORE_FORMAT, "fingerprints": fingerprints, "layers": list(layers),
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
    diff = describe_mismatch(state["fingerprints"], fingerprints)
    if diff:
        raise DumpError(f"{config.out}: the existing store was written with other inputs or settings:\n  "
                        + "\n  ".join(diff)
                        + f"\nTo start fresh, delete {config.out} or set dump.out to a new location")
    return state


def _readable(where: ShardRange, arrays: dict, specs, log) -> bool:
    """Reads every row of a complete shard back (checksums verified); False if any is damaged."""
    for spec in specs:
        start = where.token_start if spec.per == "token" else where.doc_start
        count = where.n_tokens if spec.per == "token" else where.n_docs
        unit = spec.write_rows
        try:
            read_rows(arrays[spec.name], start, start + -(-count // unit) * unit, spec.name)
        except StoreError as e:
            log(f"dump: verify: {where.name} will be rewritten: {e}")
            return False
    return True


def _complete_shards(folder: KeyValueFolder) -> set[str]:
    return {key[len("shards/"):-len(".json")] for key in folder.list("shards/")}


def _finish(folder: KeyValueFolder, state: dict, layout: StoreLayout, world: int) -> dict:
    """Records the complete shards in store.json (process 0, once every process is done writing)."""
    _barrier("emojax-dump-finished")
    if jax.process_index() == 0:
        done = _complete_shards(folder)
        records = [folder.read_json(f"shards/{s.name}.json") for s in layout.shards if s.name in done]
        state = {**state, "complete_shards": sorted(done & {s.name for s in layout.shards}),
                 "short_docs": sum(r["short_docs"] for r in records)}
        state["complete"] = len(state["complete_shards"]) == len(layout.shards)
        folder.write_json("store.json", state)
    _barrier("emojax-dump-recorded")
    return folder.read_json("store.json") if jax.process_index() else state


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _Step:
    """The jitted forward (hidden states only, layers past the deepest capture skipped) and the on-device
    reduction to what is stored: activations cast to the store dtype and pooled means in float32."""

    def __init__(self, lm, layers: tuple[int, ...], pool_start: int, dtype: str):
        self.lm, self.pool_start = lm, pool_start
        self.forward = lm._forward_fn(layers, None, logits=False)
        self.reduce = _reduce_fn(pool_start, dtype)

    def __call__(self, tokens: np.ndarray, mask: np.ndarray):
        with self.lm._precision():
            out = self.forward(self.lm.params, tokens, mask, None, None)
        return self.reduce(out.hidden, jnp.asarray(mask))


@functools.lru_cache(maxsize=None)
def _reduce_fn(pool_start: int, dtype: str):
    return jax.jit(partial(_reduce, pool_start=pool_start, dtype=jnp.dtype(dtype)))


def _reduce(hidden, mask_BT, *, pool_start: int, dtype):
    T = mask_BT.shape[1]
    valid_BT = mask_BT.astype(bool)
    n_B = valid_BT.sum(axis=1)
    # Positions >= pool_start; documents no longer than pool_start are pooled over all their tokens.
    pooled_BT = valid_BT & ((jnp.arange(T)[None, :] >= pool_start) | (n_B[:, None] <= pool_start))
    count_B = pooled_BT.sum(axis=1)
    weights_BT = pooled_BT.astype(jnp.float32) / jnp.maximum(count_B, 1)[:, None].astype(jnp.float32)
    pooled = tuple(jnp.einsum("BTD,BT->BD", h.astype(jnp.float32), weights_BT,
                              precision=jax.lax.Precision.HIGHEST) for h in hidden)
    return tuple(h.astype(dtype) for h in hidden), pooled, count_B


def _dump_shard(shard: corpus_shards.CorpusShard, where: ShardRange, arrays: dict, layers: tuple[int, ...],
                buckets: tuple[int, ...], rows: dict[int, int], step: _Step, writes: Writes, progress,
                vocab_size: int) -> dict:
    """Writes one corpus shard's rows; returns its completion record (written by the caller after commit)."""
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
        batch, mask, (tokens_out, pooled_out, count) = pending.popleft()
        n = len(batch.docs)
        real = mask[:n].astype(bool)
        for layer, t, p in zip(layers, tokens_out, pooled_out):
            token_rows[layer].append(np.asarray(t)[:n][real])  # pad positions never reach the store
            pooled[layer][position:position + n] = np.asarray(p)[:n]
        n_pooled[position:position + n] = np.asarray(count)[:n]
        position += n
        progress.advance(int(real.sum()), n, writes.bytes_written)

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
            "short_docs": int((lengths <= step.pool_start).sum()),
            "doc_ids": [shard.doc_ids[i] for i in order]}


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
