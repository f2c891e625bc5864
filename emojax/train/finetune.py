"""Fine-tuning a loaded model on prompt/response samples, optionally steered during training ("preventative
steering", docs/finetune.md).

    lm = load_model("path/to/model")
    steering = bank_steering("concepts/", lm, [parse_steer("desperate=0.1@3")])  # emojax.steer.interventions
    finetune(FinetuneConfig(), ["data.jsonl"], lm, "out/", steering=steering)

All parameters are trained (no LoRA) through the built-in model's trainer: AdamW, orbax checkpoints, exact resume.
The loss counts the response's tokens only. Steering adds each concept's bank vector (strength in the study's unit:
a fraction of that layer's mean residual norm) to the residual stream at every position of every training
forward; the exported model is the trained parameters alone. out/ is a Hugging Face folder (the source's
config.json and tokenizer files) with train.json: the held-out loss per response token before and after, the
steering used, the history. The fingerprint covers the settings, the data files' bytes, the source model's
content identity and the steering vectors, so an interrupted fine-tune resumes and another is never mixed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from emojax.corpus.samples import read_samples
from emojax.digest import digest
from emojax.errors import CheckpointError, InputError
from emojax.fileio import write_json
from emojax.models.interventions import Interventions
from emojax.models.lm import LanguageModel, stop_tokens
from emojax.train.builtin import TRAIN_JSON, export_params, train_into
from emojax.train.config import FinetuneConfig, Optimization
from emojax.train.data import TokenData, sample_token_data

FINETUNE_FORMAT = 1  # bump when the meaning of a fine-tuned folder changes (rows, loss, export)
# Besides tokenizer.json (written with the weights): the files that carry the source's chat template and specials.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
_STEER = re.compile(r"^(?P<concept>[^=@]+)=(?P<strength>[^=@]+)@(?P<layer>\d+)$")


@dataclasses.dataclass(frozen=True)
class Steer:
    """One `--steer concept=strength@layer`: the concept's bank vector times `strength` (a fraction of the layer's
    mean residual norm) added at residual index `layer` during training."""

    concept: str
    strength: float
    layer: int

    def __str__(self) -> str:
        return f"{self.concept}={self.strength:g}@{self.layer}"


def parse_steer(text: str) -> Steer:
    """'desperate=0.1@3' -> Steer("desperate", 0.1, 3); InputError naming the argument otherwise."""
    match = _STEER.match(text.strip())
    try:
        if match is None or not math.isfinite(float(match["strength"])):
            raise ValueError
        return Steer(match["concept"].strip(), float(match["strength"]), int(match["layer"]))
    except ValueError:
        raise InputError(f"--steer {text!r}: expected concept=strength@layer, e.g. desperate=0.1@3 (strength: a "
                         "fraction of the layer's mean residual norm; layer: a residual index of the bank)") from None


@dataclasses.dataclass(frozen=True)
class Steering:
    """Steering during training: the interventions (batch 1) and what they are, for train.json and the fingerprint.
    `bank`: the bank's path and the identity of the model it was fitted on."""

    interventions: Interventions
    steers: tuple[Steer, ...]
    bank: dict

    def describe(self) -> list[dict]:
        return [{**dataclasses.asdict(s), "unit": "norm", "positions": "all"} for s in self.steers]


def finetune(config: FinetuneConfig, data: Sequence[str | Path], lm: LanguageModel, out: str | Path, *,
             steering: Steering | None = None, progress: bool = True, until: int | None = None) -> Path:
    """Fine-tunes `lm` (loaded from a checkpoint folder with a tokenizer) on the samples of `data` into `out`.

    steering: applied in every training forward, never exported. Like train_lm: a finished `out` of this
    fine-tune returns at once, `until` stops after that many steps (returning out.partial/, resumed by the next
    call), and a folder holding another model is never replaced.
    """
    if lm.tokenizer is None or lm.identity is None:
        raise CheckpointError(f"--from {lm.source or 'the model'}: fine-tuning needs a checkpoint folder with a "
                              "tokenizer.json (the samples are read through the model's tokenizer, and the output "
                              "keeps it)")
    files = [Path(p) for p in data]
    samples = read_samples(files)
    tokens = sample_token_data(samples, lm.tokenizer, next(iter(stop_tokens(lm)), None), config.eval_fraction,
                               lm.config.max_position_embeddings)
    opt = config.optimization(tokens.n_train_docs)
    hashes = [_sha256(f) for f in files]
    steers = [] if steering is None else steering.describe()
    fingerprint = digest({
        "format_version": FINETUNE_FORMAT, "settings": config.settings(), "source": lm.identity["id"],
        "data": hashes, "steering": steers,
        "interventions": None if steering is None else steering.interventions.fingerprint(),
    })
    record = {
        "fingerprint": fingerprint, "format_version": FINETUNE_FORMAT, "method": "full",
        "source": {"model": str(lm.source), "identity": lm.identity["id"]},
        "data": [{"file": str(f), "sha256": h} for f, h in zip(files, hashes)],
        "bank": None if steering is None else steering.bank, "steering": steers,
        "config": config.settings(), "steps": opt.steps, "warmup_steps": opt.warmup_steps,
    }
    iv = None if steering is None else steering.interventions
    return train_into(Path(out), fingerprint, lambda work: _train(lm, tokens, opt, iv, record, work, progress, until))


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _train(lm: LanguageModel, data: TokenData, opt: Optimization, iv: Interventions | None, record: dict,
           work: Path, progress: bool, until: int | None) -> bool:
    from flax import nnx

    from emojax.train.evaluate import heldout_nll, make_eval_fn
    from emojax.train.trainer import Trainer, count_params

    params = nnx.to_pure_dict(lm.params)
    trainer = Trainer(opt, lm.config, data, work / "checkpoints", record["fingerprint"], initial_params=params,
                      interventions=iv)
    eval_fn = make_eval_fn(trainer.graphdef)
    t0 = time.perf_counter()
    before, n_targets = heldout_nll(eval_fn, params, data, opt.batch_size)
    t_eval = time.perf_counter() - t0
    try:
        state, timing = trainer.run(until=until, progress=progress)
    finally:
        trainer.close()
    if int(state.step) < opt.steps:
        return False
    t0 = time.perf_counter()
    after, _ = heldout_nll(eval_fn, state.params, data, opt.batch_size)  # unsteered: the exported model
    t_eval += time.perf_counter() - t0

    export_params(lm.config, state.params, lm.tokenizer, lm.hf_config, work)
    for name in TOKENIZER_FILES:
        if (Path(lm.source) / name).is_file():
            shutil.copyfile(Path(lm.source) / name, work / name)
    info = {
        **record,
        "parameters": count_params(state.params),
        "samples": {"train": data.n_train_docs, "heldout": data.n_heldout_docs},
        "tokens": {"row_length": int(data.train.shape[1]), "train_response_tokens": int(data.train_mask[:, 1:].sum()),
                   "heldout_targets": n_targets},
        # mean NLL per held-out response token (nats), unsteered: the source model, then the fine-tuned one
        "heldout_nll_before": before,
        "heldout_nll_after": after,
        "timing": {"train_seconds": timing["seconds"], "eval_seconds": t_eval,
                   "tokens_per_second": timing["tokens_per_second"], "resumed_from_step": trainer.resumed_from},
        "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
        "history": trainer.history,  # training losses: steered, when steering
    }
    write_json(work / TRAIN_JSON, info)  # written last: marks the export done
    return True
