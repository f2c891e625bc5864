"""The driver of `emojax screen`: checks everything it can before any scoring, runs the Beam pipeline over the
shards still to do (emojax.pipelines.screen), then merges, flags and writes the manifest.

    manifest = screen(ScreenConfig(data=("train.jsonl",), bank="runs/x/concepts", concepts=("angry",), out="scr"))

Writes to `out`:
    shards/part-IIIII-of-NNNNN.parquet  the scored shards (the resumable unit)
    scores.parquet                      every sample's row (emojax.screen.score's schema), by sample id
    flags.jsonl                         per concept, the flagged samples in rank order
    manifest.json                       inputs, model, bank, layer, settings, counts, flags per concept, shards and
                                        throughput; written last, so its presence marks a complete screen
Every file but manifest.json's "throughput" is a pure function of the inputs and settings: byte-identical across
runners, worker counts and resumed runs. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from emojax.concepts.bank import ConceptBank, check_model, load_bank
from emojax.concepts.layer import bank_layer
from emojax.corpus.samples import Sample, read_samples
from emojax.digest import arrays_digest, digest
from emojax.errors import CheckpointError
from emojax.locks import writer_lock
from emojax.models.config import ModelConfig
from emojax.models.hf_config import read_hf_config
from emojax.models.identity import model_identity
from emojax.models.presets import BUILTIN_NAMES, RANDOM_PREFIX, SHAPES, resolve_builtin
from emojax.pipelines.outputs import parquet_bytes, write_atomic, shard_path
from emojax.pipelines.screen import FINGERPRINT_KEY, score_shards, shard_fingerprint, shards_to_do
from emojax.progress import fmt
from emojax.screen.config import ScreenConfig, ScreenError
from emojax.screen.flags import flag
from emojax.screen.score import SCORES, ScoringSpec, column, encode, token_limit
from emojax.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

FORMAT = "emojax-screen-v1"
SCORES_FILE, FLAGS_FILE, MANIFEST_FILE = "scores.parquet", "flags.jsonl", "manifest.json"
TOKEN_COUNTS = {"prompt": "n_prompt_tokens", "response": "n_response_tokens", "own": "n_own_tokens"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked screen, ready to run: the samples, the workers' spec, and what the manifest records."""

    samples: list[Sample]
    spec: ScoringSpec
    fingerprint: str
    inputs: list[dict]  # {"path", "sha256"} per data file
    model: str  # as named (screen.model or the bank's)
    identity: dict  # its content identity (emojax.models.identity)
    bank: ConceptBank


def plan(config: ScreenConfig, log: Callable[[str], None]) -> Plan:
    """Reads and checks everything before any scoring: the samples (a bad row, or a prompt too long for the
    model, names its file and row), the bank and its concepts, the model the bank was fitted on."""
    for key in ("data", "bank", "concepts", "out"):
        if not getattr(config, key):
            raise ScreenError(f"screen.{key} is not set (--{key})")
    samples = read_samples(config.data)
    bank = load_bank(config.bank)
    for concept in config.concepts:
        bank.concept_index(concept)  # a BankError naming an unknown concept
    model, folder = _model(config, bank)
    identity = model_identity(folder)
    warning = check_model(bank, identity, model, force=config.force)
    if warning:
        log(f"screen: warning: {warning}")
    model_config = _model_config(folder)
    layer = bank_layer(bank, model_config.n_layers, config.layer)
    spec = ScoringSpec(model=folder, dtype=config.dtype, mesh=tuple(config.mesh), layer=layer,
                       concepts=tuple(config.concepts),
                       vectors=np.stack([bank.vector(c, layer, unit=True) for c in config.concepts]).astype(np.float32),
                       max_tokens=config.max_tokens, max_new_tokens=config.max_new_tokens,
                       batch_size=config.batch_size, examples=config.examples)
    tokenizer, limit = _tokenizer(folder), token_limit(model_config, config.max_tokens)
    for s in samples:  # the workers encode again; here every bad sample is named before anything runs
        encode(s, tokenizer, limit)
    inputs = [{"path": str(p), "sha256": _file_sha256(p)} for p in config.data]
    fingerprint = digest({"format": FORMAT, "inputs": inputs, "model": identity, "settings": spec.settings(),
                          "n_shards": config.n_shards})
    return Plan(samples, spec, fingerprint, inputs, model, identity, bank)


def screen(config: ScreenConfig, beam_args: Sequence[str] = (), log: Callable[[str], None] | None = None) -> dict:
    """Screens `config.data` and returns the manifest. `beam_args`: Beam pipeline options (default: the local
    DirectRunner). Bad rows, unknown concepts and a bank fitted on another model are refused before any scoring."""
    log = log or (lambda _message: None)
    p = plan(config, log)
    out, n = config.out, config.n_shards
    with writer_lock(out, what="screen output"):
        todo = shards_to_do(out, n, p.fingerprint)
        log(f"screen: {fmt(len(p.samples))} samples, concepts {', '.join(config.concepts)} at residual index "
            f"{p.spec.layer}; {len(todo)} of {n} shards to score ({n - len(todo)} done before)")
        start = time.perf_counter()
        score_shards(p.samples, todo, p.spec, out, n, p.fingerprint, beam_args)
        seconds = time.perf_counter() - start
        table, shards = _merge(out, n, p.fingerprint)
        write_atomic(FileSystems.join(out, SCORES_FILE), parquet_bytes(table.to_pylist(), table.schema))
        per_concept = _write_flags(out, table, config)
        done = {shard_path(out, i, n).rsplit("/", 1)[-1] for i in todo}
        manifest = _manifest(config, p, table, shards, per_concept, _throughput(shards, done, seconds))
        write_atomic(FileSystems.join(out, MANIFEST_FILE),
                      (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        _remove_stale(out, {s["name"] for s in shards})
    t = manifest["throughput"]
    log(f"screen: scored {fmt(t['samples'])} samples ({fmt(t['tokens'])} tokens) in {fmt(t['seconds'])} s: "
        f"{fmt(t['samples_per_s'])} samples/s, {fmt(t['tokens_per_s'])} tokens/s; flagged "
        + ", ".join(f"{c} {fmt(v['flagged'])}" for c, v in per_concept.items()))
    return manifest


def _model(config: ScreenConfig, bank: ConceptBank) -> tuple[str, str]:
    """(the model as named, its checkpoint folder or random:* preset): screen.model, else the bank's recorded
    model; a built-in name resolves to its cached folder (trained on first use)."""
    model = config.model or str(bank.info.get("store_model") or "")
    if not model:
        raise ScreenError(f"{bank.source or 'the bank'}: bank.json records no model: name the one it was fitted on "
                          "with --model")
    folder = str(resolve_builtin(model)) if model in BUILTIN_NAMES and not Path(model).exists() else model
    return model, folder


def _model_config(folder: str) -> ModelConfig:
    """The model's shape, from its config.json (or the preset), without loading any weight."""
    if folder.startswith(RANDOM_PREFIX) and not Path(folder).exists():
        shape = folder[len(RANDOM_PREFIX):]
        if shape not in SHAPES:
            raise CheckpointError(f"unknown preset {folder!r}")
        return SHAPES[shape]
    return read_hf_config(Path(folder))


def _tokenizer(folder: str) -> Tokenizer:
    """The tokenizer the workers read with (emojax.models.lm.tokenizer_for): the checkpoint's, else bytes."""
    path = Path(folder) / "tokenizer.json"
    return load_tokenizer(path) if path.is_file() else ByteTokenizer()


def _file_sha256(path) -> str:
    digest_ = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest_.update(block)
    return digest_.hexdigest()


def _merge(out: str, n: int, fingerprint: str) -> tuple[pa.Table, list[dict]]:
    """Every shard's rows in sample-id order, and each shard's name, row and token counts and checksum."""
    tables, shards = [], []
    for i in range(n):
        path = shard_path(out, i, n)
        if shard_fingerprint(path) != fingerprint:
            raise ScreenError(f"{path}: missing or from another run after the pipeline finished (a runner that "
                              "skipped work?); rerun to score it")
        with FileSystems.open(path) as f:
            data = f.read()
        tables.append(pq.read_table(pa.BufferReader(data)))
        shards.append({"name": path.rsplit("/", 1)[-1], "rows": tables[-1].num_rows,
                       "tokens": sum(_total(tables[-1], k) for k in TOKEN_COUNTS.values()),
                       "sha256": hashlib.sha256(data).hexdigest()})
    table = pa.concat_tables(tables).sort_by("sample_id")
    return table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()}), shards


def _write_flags(out: str, table: pa.Table, config: ScreenConfig) -> dict[str, dict]:
    """flags.jsonl (per concept, the flagged samples in rank order) and each concept's summary for the manifest."""
    ids = np.asarray(table.column("sample_id").to_pylist(), str)
    where = table.column("where").to_pylist()
    rule = config.flag
    lines, summary = [], {}
    for concept in config.concepts:
        scores = {s: table.column(column(s, concept)).to_numpy() for s in SCORES}
        flags = flag(scores[rule.by], ids, rule)
        for rank, i in enumerate(flags.flagged, start=1):
            lines.append(json.dumps({"concept": concept, "rank": rank, "sample_id": str(ids[i]), "where": where[i],
                                     "score": float(scores[rule.by][i]), "z": float(flags.z[i]),
                                     **{s: float(v[i]) for s, v in scores.items()}}, sort_keys=True))
        summary[concept] = {"flagged": flags.n_flagged, "cutoff": flags.cutoff, "mean": flags.mean, "std": flags.std}
    write_atomic(FileSystems.join(out, FLAGS_FILE), "".join(line + "\n" for line in lines).encode())
    return summary


def _throughput(shards: list[dict], done: set[str], seconds: float) -> dict:
    """Samples and tokens (prompt and response read, own tokens generated) scored by this run, per second of the
    pipeline (compilation included)."""
    scored = [s for s in shards if s["name"] in done]
    samples, tokens = sum(s["rows"] for s in scored), sum(s["tokens"] for s in scored)
    return {"shards_scored": len(scored), "shards_skipped": len(shards) - len(scored), "samples": samples,
            "tokens": tokens, "seconds": round(seconds, 3), "samples_per_s": samples / seconds if seconds else 0.0,
            "tokens_per_s": tokens / seconds if seconds else 0.0}


def _manifest(config: ScreenConfig, p: Plan, table: pa.Table, shards: list[dict], per_concept: dict,
              throughput: dict) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("data", "bank", "model", "out")}
    layer = p.spec.layer
    return {
        "format": FORMAT, "fingerprint": p.fingerprint,
        "inputs": p.inputs, "samples": len(p.samples),
        "model": p.model, "model_identity": p.identity.get("id"), "bank": str(config.bank), "layer": layer,
        "concepts": list(config.concepts), "settings": settings,
        "tokens": {name: _total(table, key) for name, key in TOKEN_COUNTS.items()},
        "responses_truncated": _total(table, "response_truncated"),
        "vectors_sha256": arrays_digest({c: p.bank.vector(c, layer, unit=True) for c in config.concepts}),
        "flags": per_concept, "shards": shards, "throughput": throughput,
    }


def _total(table: pa.Table, key: str) -> int:
    return int(pc.sum(table.column(key).cast(pa.int64())).as_py() or 0)


def _remove_stale(out: str, current: set[str]) -> None:
    """Shards of an earlier run with another shard count would be read as part of this one."""
    folder = FileSystems.join(out, "shards")
    stale = [m.path for m in FileSystems.match([FileSystems.join(folder, "*.parquet")])[0].metadata_list
             if m.path.rsplit("/", 1)[-1] not in current]
    if stale:
        FileSystems.delete(stale)
