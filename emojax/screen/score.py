"""The scores of `emojax screen`, per sample and concept c (v_c the bank's unit vector at the layer, h_t the residual
stream there at token t):

    proj_c = mean over the sample's response tokens t of  h_t . v_c
    own_c  = the same over the model's own greedy response to the sample's prompt (the compiled decode loop)
    diff_c = proj_c - own_c        (persona vectors' data flagging: what the prompt alone does not explain)

Readings are the monitor's `Readout` with metric "dot" from the origin (no centre: a centre would only shift every
reading of a concept by the same constant, which the difference cancels). Response tokens are those after the
prompt's (Sample.token_ids); a response longer than the token limit is cut to fit. A stop token the model emits
counts as one of its own tokens.

`ScoringSpec` is what a pipeline worker needs (picklable); `ScoringSpec.load()` gives the worker's `Scorer`, loaded
once per process and shared by its threads.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import jax
import numpy as np
import pyarrow as pa

from emojax.corpus.samples import Sample
from emojax.digest import arrays_digest, digest
from emojax.errors import InputError
from emojax.models import load_model, make_mesh
from emojax.models.config import ModelConfig
from emojax.models.lm import stop_tokens, tokenizer_for
from emojax.steer.decode import DecodeConfig, Decoder, fixed_batches
from emojax.steer.monitor import Readout
from emojax.steer.text import token_texts
from emojax.tokenizer import Tokenizer, left_pad

SCORES = ("proj", "own", "diff")
KEPT = ("proj", "diff")  # the scores whose top samples keep their per-token projections (what flags rank by)


def column(score: str, concept: str) -> str:
    """The Parquet column of a score ("proj", "own", "diff") or of per-token projections ("tokens") of a concept."""
    return f"{score}_{concept}"


def token_limit(config: ModelConfig, max_tokens: int) -> int:
    """The tokens a sample is read up to: max_tokens, and never past the model's positions."""
    positions, _ = config.position_limit
    return min(max_tokens, positions or max_tokens)


def length_buckets(limit: int, smallest: int = 16) -> tuple[int, ...]:
    """The padded lengths: powers of two from `smallest` while below `limit`, then `limit` itself."""
    buckets, b = [], smallest
    while b < limit:
        buckets.append(b)
        b *= 2
    return (*buckets, limit)


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: list[int]  # prompt then response, cut to the token limit
    n_prompt: int
    truncated: bool  # the response was cut

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.n_prompt


def encode(sample: Sample, tokenizer: Tokenizer, limit: int) -> Encoded:
    """The sample's tokens, its response cut to `limit` tokens in all. A prompt with no tokens (the own response has
    nothing to follow), one leaving no room for a response token, or a response with no tokens is an error naming
    the sample's file and row."""
    ids, n_prompt = sample.token_ids(tokenizer)
    where = f"{sample.where}: sample {sample.sample_id!r}"
    if n_prompt == 0:
        raise InputError(f"{where}: the prompt encodes to no tokens; the model's own response needs a prompt to follow")
    if n_prompt >= limit:
        raise InputError(f"{where}: the prompt has {n_prompt} tokens, leaving none of the {limit} the model reads "
                         "(screen.max_tokens and the model's positions) for the response; shorten it")
    if len(ids) == n_prompt:
        raise InputError(f"{where}: the response encodes to no tokens")
    return Encoded(ids[:limit], n_prompt, len(ids) > limit)


def response_means(reads_BTC: np.ndarray, n_response_B: Sequence[int]) -> np.ndarray:
    """[B, C] float64 mean of each left-padded row's last n_response columns (its response)."""
    T = reads_BTC.shape[1]
    return np.stack([reads_BTC[b, T - n:].astype(np.float64).mean(0) for b, n in enumerate(n_response_B)])


def own_means(reads_BSC: np.ndarray, prompt_columns: int, n_B: Sequence[int]) -> np.ndarray:
    """[B, C] float64 mean of each row's first n generated columns (the decode loop's columns P, P + 1, ...)."""
    P = prompt_columns
    return np.stack([reads_BSC[b, P:P + n].astype(np.float64).mean(0) for b, n in enumerate(n_B)])


def top_rows(scores_XC: np.ndarray, k: int) -> set[int]:
    """The rows among the `k` highest of any column (ties: the lower row, i.e. the smaller sample id, first)."""
    X = len(scores_XC)
    rows = np.arange(X)
    return {int(i) for c in range(scores_XC.shape[1]) for i in np.lexsort((rows, -scores_XC[:, c]))[:k]}


@dataclasses.dataclass(frozen=True, eq=False)
class ScoringSpec:
    """Everything a worker needs to score samples: the model, the concepts' unit vectors [C, D] at `layer`, and
    the settings of emojax.screen.config.ScreenConfig that change scores."""

    model: str  # a checkpoint folder or a random:* preset
    dtype: str
    mesh: tuple[int, ...]
    layer: int
    concepts: tuple[str, ...]
    vectors: np.ndarray  # [C, D] float32, unit rows
    max_tokens: int
    max_new_tokens: int
    batch_size: int
    examples: int

    def settings(self) -> dict:
        """Everything that changes a score but the model (which the run fingerprints by content, not path)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "vectors")}
        return {**fields, "vectors": arrays_digest({"vectors": self.vectors})}

    @property
    def key(self) -> str:
        return digest({**self.settings(), "model": self.model})

    @property
    def schema(self) -> pa.Schema:
        """One row per sample: ids and counts, the three scores per concept, and for the samples kept as examples
        the response's token texts and per-token projections (null for the others)."""
        fields = [("sample_id", pa.string()), ("where", pa.string()), ("n_prompt_tokens", pa.int32()),
                  ("n_response_tokens", pa.int32()), ("response_truncated", pa.bool_()), ("n_own_tokens", pa.int32())]
        fields += [(column(s, c), pa.float64()) for c in self.concepts for s in SCORES]
        fields += [("tokens", pa.list_(pa.string()))]
        fields += [(column("tokens", c), pa.list_(pa.float32())) for c in self.concepts]
        return pa.schema(fields)

    def load(self) -> Scorer:
        """This process's Scorer for the spec (loaded on first use)."""
        with _LOCK:
            if self.key not in _SCORERS:
                _SCORERS[self.key] = Scorer(self)
            return _SCORERS[self.key]


_LOCK = threading.Lock()
_SCORERS: dict[str, Scorer] = {}


class Scorer:
    """A loaded model with its compiled forward and decode loop, scoring samples batch by batch."""

    def __init__(self, spec: ScoringSpec):
        devices = jax.local_devices()
        mesh = make_mesh(spec.mesh or (len(devices), 1, 1), devices)
        self.spec = spec
        self.lm = load_model(spec.model, dtype=spec.dtype, mesh=mesh)
        self.tokenizer = tokenizer_for(self.lm)
        self.limit = token_limit(self.lm.config, spec.max_tokens)
        self.decoder = Decoder(self.lm, DecodeConfig(prompt_buckets=length_buckets(self.limit),
                                                     new_token_buckets=length_buckets(spec.max_new_tokens)))
        self.readout = Readout(concepts=np.asarray(spec.vectors, np.float32), index=np.int32(spec.layer),
                               metric="dot")
        self._read = jax.jit(lambda readout, x_BTD: readout(x_BTD))
        self.stops = stop_tokens(self.lm)
        self._lock = threading.Lock()  # one shard at a time per process: the threads of a runner share the device

    def score(self, samples: Sequence[Sample]) -> list[dict]:
        """One row per sample (the shard's schema), in the given order; the per-token projections are filled in
        for each concept's top `examples` samples by proj and by diff."""
        with self._lock:
            encoded = [encode(s, self.tokenizer, self.limit) for s in samples]
            rows, kept = [], {}
            B = self.spec.batch_size
            for part, padded in fixed_batches(len(samples), B):  # one compiled program per length bucket
                rows += self._batch([samples[i] for i in part], [encoded[i] for i in padded], kept, part[0])
                kept = self._keep(rows, kept)
            for i, per_token in kept.items():
                ids = encoded[i].ids[encoded[i].n_prompt:]
                rows[i]["tokens"] = token_texts(self.tokenizer, ids)
                for c, concept in enumerate(self.spec.concepts):
                    rows[i][column("tokens", concept)] = per_token[:, c].tolist()
            return rows

    def _batch(self, samples: list[Sample], padded: list[Encoded], kept: dict, start: int) -> list[dict]:
        """Rows of one batch (`padded`: the samples' encodings, padded to the batch size); the per-token
        projections of its responses go into `kept` (pruned by _keep)."""
        n = len(samples)
        encoded = padded[:n]
        T = _bucket(max(len(e.ids) for e in padded), self.limit)
        tokens, mask = left_pad([e.ids for e in padded], T)
        with jax.default_matmul_precision("highest"):
            hidden = self.lm(tokens, mask, capture=(self.spec.layer,), logits=False).hidden[0]
            reads_BTC = np.asarray(self._read(self.readout, hidden))
        proj = response_means(reads_BTC[:n], [e.n_response for e in encoded])

        wanted = [min(e.n_response, self.spec.max_new_tokens) for e in padded]
        n_new = min(max(wanted), self.limit - max(e.n_prompt for e in padded))
        prompts, pmask = left_pad([e.ids[:e.n_prompt] for e in padded])
        gen = self.decoder.generate(prompts, pmask, max_new_tokens=n_new, readout=self.readout, stop_tokens=self.stops)
        n_own = np.minimum(np.minimum(wanted, n_new), np.asarray(gen.n_generated))[:n]
        own = own_means(np.asarray(gen.readings), gen.prompt_columns, n_own)

        rows = []
        for b, (sample, e) in enumerate(zip(samples, encoded)):
            if not (np.isfinite(proj[b]).all() and np.isfinite(own[b]).all()):
                raise InputError(f"{sample.where}: sample {sample.sample_id!r}: the model's activations are not "
                                 "finite (NaN or inf) at the layer; a diverged or corrupt checkpoint?")
            row = {"sample_id": sample.sample_id, "where": sample.where, "n_prompt_tokens": e.n_prompt,
                   "n_response_tokens": e.n_response, "response_truncated": e.truncated, "n_own_tokens": int(n_own[b]),
                   "tokens": None}
            for c, concept in enumerate(self.spec.concepts):
                row |= {column("proj", concept): float(proj[b, c]), column("own", concept): float(own[b, c]),
                        column("diff", concept): float(proj[b, c] - own[b, c]), column("tokens", concept): None}
            rows.append(row)
            kept[start + b] = reads_BTC[b, T - e.n_response:]
        return rows

    def _keep(self, rows: list[dict], kept: dict) -> dict:
        """`kept` pruned to the rows among the top `examples` of some concept by proj or diff so far (the top of all
        rows is the top of the previous top and the new rows, so nothing else is needed later)."""
        if not self.spec.examples:
            return {}
        candidates = sorted(kept)
        scores = np.array([[rows[i][column(s, c)] for s in KEPT for c in self.spec.concepts] for i in candidates])
        keep = {candidates[j] for j in top_rows(scores, self.spec.examples)}
        return {i: kept[i] for i in candidates if i in keep}


def _bucket(n: int, limit: int) -> int:
    return next(b for b in length_buckets(limit) if b >= n)
