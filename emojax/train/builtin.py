"""Training a model into a Hugging Face-format folder, and the built-in default model cached on first use.

`train_lm(config, out)` writes out/ = config.json, model.safetensors, tokenizer.json, tokenizer_config.json
and train.json (figures, history, fingerprint). Work happens in out.partial/ (the tokenizer, orbax
checkpoints); only a finished run is renamed to out/, so a folder under the real name is always complete.
Rerunning after a crash resumes from the last checkpoint; rerunning a finished configuration returns at once.
A finished folder of another configuration is never replaced: activation stores and concept banks were made
from it. The built-in models therefore live in one folder per training fingerprint (builtin-NAME-<fp[:16]>).
`train_into` (the work folder, the lock, the rename) and `export_params` serve the fine-tune too (`finetune`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from emojax.corpus.catalogue import load_catalogue
from emojax.errors import EmojaxError
from emojax.fileio import atomic_path, move_aside, write_json, write_text
from emojax.progress import log
from emojax.tokenizer import Tokenizer
from emojax.train.bpe import BOS_ID, EOS_ID, PAD_ID, tokenizer_config, train_bpe
from emojax.train.config import FORMAT_VERSION, TrainConfig, preset_config
from emojax.train.data import build_token_data, train_and_heldout
from emojax.world import world_entropy

TRAIN_JSON = "train.json"
_EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", TRAIN_JSON)


def default_cache_dir() -> Path:
    """$EMOJAX_CACHE/models, else ~/.cache/emojax/models."""
    root = os.environ.get("EMOJAX_CACHE") or Path.home() / ".cache" / "emojax"
    return Path(root) / "models"


def read_train_json(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / TRAIN_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(folder: str | Path, fingerprint: str) -> bool:
    """True when `folder` holds a finished run of the configuration with this fingerprint."""
    folder = Path(folder)
    info = read_train_json(folder)
    return (info is not None and info.get("fingerprint") == fingerprint
            and all((folder / name).is_file() for name in _EXPORT_FILES))


def ensure_builtin_model(cache_dir: str | Path | None = None, config: TrainConfig | None = None,
                         name: str = "default", progress: bool = True) -> Path:
    """The folder of built-in model `name` (trained on first use, reused while its fingerprint matches).

    cache_dir: default `default_cache_dir()`. config: default the preset `name` ("default" or "tiny"). The
    folder is cache_dir/builtin-NAME-<the first 16 hex digits of the config's fingerprint>: another configuration
    trains into a folder of its own, so a model other runs were built on is never replaced.
    """
    config = config if config is not None else preset_config(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return train_lm(config, builtin_folder(cache_dir, name, config), progress=progress)


def builtin_folder(cache_dir: str | Path, name: str, config: TrainConfig) -> Path:
    """Where the built-in model `name` trained with `config` is cached (one folder per fingerprint)."""
    return Path(cache_dir) / f"builtin-{name}-{config.fingerprint()[:16]}"


def train_lm(config: TrainConfig, out: str | Path | None = None, progress: bool = True,
             until: int | None = None) -> Path:
    """Trains `config` into the folder `out` (default config.out) and returns it.

    Returns immediately when `out` already holds this configuration's finished run. `until` stops after that
    many steps with only the checkpoint written (as an interrupted run would) and returns the work folder
    out.partial/; the next call resumes from there. A folder holding another configuration's finished run is
    an error, never replaced.
    """
    fingerprint = config.fingerprint()
    return train_into(Path(out if out is not None else config.out), fingerprint,
                      lambda work: _train(config, work, fingerprint, progress, until))


def train_into(out: Path, fingerprint: str, train: Callable[[Path], bool]) -> Path:
    """Runs `train(work)` in out.partial/ under a lock and renames the finished folder to `out`, which it returns.

    `train` writes the export and train.json (with `fingerprint`) last, and returns False when it stopped early
    with only its checkpoint written: then the work folder is returned, to be resumed by the next call. `out`
    holding this fingerprint's finished run returns at once; holding another's is an error, never replaced.
    """
    if is_complete(out, fingerprint):
        return out
    _refuse_other_model(out, fingerprint)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _lock(out.parent / f".{out.name}.lock"):
            if is_complete(out, fingerprint):  # another process finished it while we waited
                return out
            _refuse_other_model(out, fingerprint)
            work = out.with_name(out.name + ".partial")
            _reset_if_stale(work, fingerprint)
            if not train(work):
                return work
            _replace(work, out)
    except EmojaxError:  # DiskFullError is an OSError too: keep its own message
        raise
    except OSError as e:  # full disk, no permission: the user can fix these
        raise EmojaxError(f"{e.filename or out}: cannot write the trained model ({e.strerror or e})") from None
    return out


def _refuse_other_model(out: Path, fingerprint: str) -> None:
    """`out` must be empty, absent, or an unfinished run: a finished model may have stores and banks built on it."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    info = read_train_json(out)
    if info is None:
        raise EmojaxError(f"{out}: exists and is not a train-lm output folder (no {TRAIN_JSON}); "
                          "choose another --out or remove it")
    if info.get("fingerprint") != fingerprint:
        raise EmojaxError(f"{out}: holds a model trained with another configuration (fingerprint "
                          f"{str(info.get('fingerprint'))[:16]}, this one {fingerprint[:16]}); it is not replaced, "
                          "since activation stores and concept banks may be built on it: choose another --out, or "
                          "remove the folder to retrain there")


def _train(config: TrainConfig, work: Path, fingerprint: str, progress: bool, until: int | None) -> bool:
    # Heavy imports here: `emojax --help` and config validation should not load JAX and orbax.
    from emojax.models.hf_config import config_to_hf_dict
    from emojax.train.evaluate import heldout_nll, make_eval_fn, perplexity, unigram_nll
    from emojax.train.trainer import Trainer, count_params

    t0 = time.perf_counter()
    train_docs, heldout_docs = train_and_heldout(config)
    tokenizer_file = work / "tokenizer.json"
    if tokenizer_file.is_file():  # resuming: the exact tokenizer the checkpoints were trained with
        tokenizer = Tokenizer.from_file(tokenizer_file)
    else:
        # the world's text names emotions: its tokenizer keeps the names whole (the logit lens reads them)
        names = load_catalogue().names_list if config.data == "world" else ()
        tokenizer = train_bpe((d.text for d in train_docs), config.vocab_size, words=names)
        with atomic_path(tokenizer_file) as tmp:
            tokenizer.backend.save(str(tmp))
    data = build_token_data(config, tokenizer, train_docs, heldout_docs)
    t_data = time.perf_counter() - t0

    trainer = Trainer(config.optimization(), config.model_config(), data, work / "checkpoints", fingerprint)
    try:
        state, timing = trainer.run(until=until, progress=progress)
    finally:
        trainer.close()
    if int(state.step) < config.steps:
        return False

    eval_fn = make_eval_fn(trainer.graphdef)
    t_eval = time.perf_counter()
    model_nll, n_targets = heldout_nll(eval_fn, state.params, data, config.batch_size)
    base_nll = unigram_nll(data, config.vocab_size)
    entropy = _world_entropy(heldout_docs, tokenizer) if config.data == "world" else None
    t_eval = time.perf_counter() - t_eval

    hf = config_to_hf_dict(trainer.model_config) | {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                                                    "pad_token_id": PAD_ID}
    export_params(trainer.model_config, state.params, tokenizer, hf, work)
    write_json(work / "tokenizer_config.json", tokenizer_config(config.seq_len), indent=2)
    info = {
        "fingerprint": fingerprint,
        "format_version": FORMAT_VERSION,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "out"},
        "parameters": count_params(state.params),
        "tokenizer_vocab": tokenizer.vocab_size,
        "documents": {"train": data.n_train_docs, "heldout": data.n_heldout_docs},
        "tokens": {"train_rows": int(data.train.shape[0]), "row_length": int(data.train.shape[1]),
                   "train_tokens": int(data.train.size), "train_tokens_dropped": data.train_tokens_dropped,
                   "heldout_targets": n_targets, "trained_on": config.steps * config.batch_size * config.seq_len},
        "heldout_nll": model_nll,
        "heldout_perplexity": perplexity(model_nll),
        "unigram_nll": base_nll,
        "unigram_perplexity": perplexity(base_nll),
        # the world's own entropy over the same held-out documents and tokens: the best loss any model could reach
        "world_entropy": entropy,
        "timing": {"data_seconds": t_data, "train_seconds": timing["seconds"], "eval_seconds": t_eval,
                   "tokens_per_second": timing["tokens_per_second"], "resumed_from_step": trainer.resumed_from},
        "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
        "history": trainer.history,
    }
    write_json(work / TRAIN_JSON, info)  # written last: marks the export done
    return True


def _world_entropy(docs, tokenizer: Tokenizer) -> dict:
    """The world's entropy over held-out world documents, per token of the model's tokenizer (text + <eos>, the
    targets the held-out NLL counts) and per document."""
    e = world_entropy(docs, lambda text: len(tokenizer.backend.encode(text, add_special_tokens=False).ids))
    return {"nats_per_token": e.nats_per_token, "nats_per_document": e.nats_per_document,
            "stderr_per_document": e.stderr_per_document, "documents": e.n_documents, "tokens": e.n_tokens}


def export_params(model_config, params: dict, tokenizer: Tokenizer, hf_config: dict | None, folder: Path) -> None:
    """Writes trained parameters (an nnx pure dict) as a Hugging Face folder: config.json (`hf_config`, None: made
    from `model_config`), model.safetensors and tokenizer.json."""
    from flax import nnx

    from emojax.models.lm import LanguageModel, abstract_model
    from emojax.models.sharding import single_device_mesh

    graphdef, state = nnx.split(abstract_model(model_config))
    nnx.replace_by_pure_dict(state, params)
    LanguageModel(model_config, graphdef, state, single_device_mesh(), tokenizer, source="train-lm",
                  hf_config=hf_config).save(folder)


def _reset_if_stale(work: Path, fingerprint: str) -> None:
    """Keeps out.partial/ only if it belongs to this configuration (its checkpoints can be resumed); another
    configuration's unfinished work is moved aside to out.partial.old-<time>/, never deleted."""
    marker = work / "fingerprint"
    if work.exists() and (not marker.is_file() or marker.read_text().strip() != fingerprint):
        moved = move_aside(work)
        log(f"train-lm: {work} held another configuration's unfinished training; moved to {moved}")
    work.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_text(marker, fingerprint + "\n")


def _replace(work: Path, out: Path) -> None:
    """Turns the finished work folder into `out` (replacing only an empty folder or an unfinished export of
    this configuration there: _refuse_other_model ran under the lock)."""
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    (work / "fingerprint").unlink(missing_ok=True)
    stale = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(stale, ignore_errors=True)
        out.rename(stale)
    work.rename(out)
    shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock held while a folder is trained (two processes never train the same folder)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
