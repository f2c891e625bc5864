"""The steering decode loop: prefill and KV-cached decoding in one jitted `lax.while_loop`.

    decoder = Decoder(lm)
    gen = decoder.generate(tokens_BT, mask_BT, max_new_tokens=64, interventions=iv, readout=readout)
    gen.tokens [B, S]  gen.readings [B, S, C]

Shapes are static: the prompt is left-padded to a prompt bucket P and the cache holds P + n_new columns, n_new
the new-token bucket; the loop compiles once per (batch, P, n_new, intervention structure, readout structure) and
never for new prompts, strengths, vectors, temperatures, stop tokens or max_new_tokens (all arrays).

Columns: [0, P) the prompt (left padding first), P + j the j-th generated token. Positions count real tokens,
as in `lm(tokens, attention_mask)`, so generation from a padded prompt equals generation from the unpadded one.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from emojax.errors import InputError
from emojax.models.interventions import Interventions
from emojax.models.lm import LanguageModel
from emojax.models.sharding import batch_multiple
from emojax.models.transformer import KVCache, layer_segments
from emojax.steer.monitor import Readout
from emojax.steer.sampling import Sampling, choose, greedy
from emojax.tokenizer import left_pad


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """prompt_buckets / new_token_buckets: the static lengths prompts and generations are padded to.
    unroll_layers: call each layer with its own static weights (the default) instead of scanning the stacked
    layers. A scan step copies each layer's weights out of the stack on every token; unrolled, a step reads
    them in place. scripts/bench_decode.py, 56M Llama shape, 2-core CPU, 128 new tokens: batch 1 73 vs 62
    tok/s unrolled vs scanned; batch 32 329 vs 363 tok/s (within that machine's run-to-run noise). Compile
    time grows with depth when unrolled (8 s vs 5 s at batch 1, 19 s vs 13 s at batch 32, 8 layers).
    stream_chunk: readings go to `on_readings` every this many generated tokens.
    beyond_max_positions: let a RoPE model decode past its max_position_embeddings (the context it was trained
    for; what comes after is extrapolation). Learned position tables (GPT-2) end there: always refused."""

    prompt_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    new_token_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    unroll_layers: bool = True
    stream_chunk: int = 32
    stop_slots: int = 8  # the stop-token list is padded to a multiple of this (new lists of the size: no recompile)
    beyond_max_positions: bool = False

    def __post_init__(self):
        for name in ("prompt_buckets", "new_token_buckets"):
            b = getattr(self, name)
            if not b or list(b) != sorted(set(b)) or b[0] < 1:
                raise InputError(f"{name} must be increasing positive lengths, got {b}")


def check_positions(cfg, lengths_B: np.ndarray, max_new_tokens: int, beyond_max_positions: bool = False) -> None:
    """Refuses, before decoding, a prompt whose length plus max_new_tokens passes the model's position limit:
    past a learned position table there is no embedding at all, past a RoPE model's max_position_embeddings the
    model extrapolates (allowed with beyond_max_positions). lengths_B: real tokens per prompt row."""
    learned = bool(cfg.learned_positions)
    limit, _ = cfg.position_limit
    if not limit or (beyond_max_positions and not learned):
        return
    row = int(np.argmax(lengths_B))
    longest = int(lengths_B[row])
    if longest + max_new_tokens <= limit:
        return
    which = f"prompt {row + 1} of {len(lengths_B)}" if len(lengths_B) > 1 else "the prompt"
    kind = "learned positions" if learned else "positions (max_position_embeddings in its config.json)"
    allow = "" if learned else "; or allow RoPE extrapolation with --beyond-max-positions"
    raise InputError(f"{which} has {longest} tokens and max_new_tokens is {max_new_tokens}: {longest + max_new_tokens} "
                     f"positions, past the model's limit of {limit} {kind}; shorten the prompt or lower "
                     f"--max-new-tokens to at most {max(limit - longest, 0)}{allow}")


def fixed_batches(n: int, batch_size: int) -> Iterator[tuple[list[int], list[int]]]:
    """(part, rows) for each batch of `n` items: `part` the items' indices, `rows` the same padded with the first to
    `batch_size`, so every batch has one shape and the decode loop compiles once per prompt bucket."""
    for start in range(0, n, batch_size):
        part = list(range(start, min(start + batch_size, n)))
        yield part, part + [part[0]] * (batch_size - len(part))


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise InputError(f"{what} of {n} exceeds the largest bucket ({buckets[-1]}); shorten it or configure "
                         "larger buckets (DecodeConfig)")
    return buckets[i]


@struct.dataclass
class Generation:
    """What one decode call returns (device arrays; `positions` etc. are host helpers).

    tokens [B, S] int32   prompt columns [0, P) (left-padded), then the generated tokens (pad after a stop)
    valid [B, S] bool     real tokens
    n_generated [B]       generated tokens per row (a stop token counts)
    readings [B, S, C]    concept projections of every real token (None without a readout)
    logits [B, n_new, V]  the logits each generated token was chosen from (None unless asked for)
    """

    tokens: jax.Array
    valid: jax.Array
    n_generated: jax.Array
    readings: jax.Array | None = None
    logits: jax.Array | None = None
    prompt_columns: int = struct.field(pytree_node=False, default=0)

    def positions(self) -> np.ndarray:
        """[B, S] token position of each column (0 = the row's first prompt token), -1 where not valid."""
        valid = np.asarray(self.valid)
        return np.where(valid, np.cumsum(valid, axis=1) - 1, -1)

    def generated(self, row: int) -> list[int]:
        n = int(np.asarray(self.n_generated)[row])
        return [int(t) for t in np.asarray(self.tokens)[row, self.prompt_columns:self.prompt_columns + n]]

    def sequence(self, row: int) -> list[int]:
        """The row's real tokens: prompt then generated."""
        return [int(t) for t, v in zip(np.asarray(self.tokens)[row], np.asarray(self.valid)[row]) if v]


@struct.dataclass
class _State:
    step: jax.Array  # scalar: the loop feeds column P + step
    tokens: jax.Array  # [B, S]
    valid: jax.Array  # [B, S]
    go: jax.Array  # [B] the row generates a token at column P + step
    n_generated: jax.Array  # [B]
    next_logits: jax.Array  # [B, V] the logits that token is chosen from
    cache: KVCache
    key: jax.Array
    readings: jax.Array | None  # [B, S, C]
    logits: jax.Array | None  # [B, n_new, V]
    chunk: jax.Array | None  # [B, n, C] readings not yet streamed
    chunk_pos: jax.Array | None  # [B, n] their positions (-1: none)
    chunk_fill: jax.Array | None  # scalar


class Decoder:
    """Generation with interventions and monitoring for one LanguageModel (jitted per shape, see module doc)."""

    def __init__(self, lm: LanguageModel, config: DecodeConfig = DecodeConfig()):
        self.lm = lm
        self.config = config
        self.trace_count = 0  # times the decode loop was traced (= compiled); tests read it
        self._sink: Callable | None = None
        self._jitted = jax.jit(self._decode, static_argnames=("n_new", "return_logits", "stream"))

    # -- host side ---------------------------------------------------------------------------------------------

    def generate(self, tokens, attention_mask=None, *, max_new_tokens: int = 32,
                 interventions: Interventions | None = None, sampling: Sampling | None = None,
                 key: jax.Array | None = None, stop_tokens: Sequence[int] = (), pad_id: int = 0,
                 readout: Readout | None = None, on_readings: Callable | None = None,
                 return_logits: bool = False) -> Generation:
        """Generates up to `max_new_tokens` after each left-padded prompt row of tokens [B, T].

        interventions: built for batch B (Interventions.empty(B, ...).add(...)).
        sampling: None compiles a greedy-only loop; a `Sampling` (temperature 0 rows are greedy) compiles the
        sampling loop once for every temperature / top-k / top-p. key: a jax PRNG key (used when sampling).
        stop_tokens: ids that end a row (the stop token is kept; later columns hold 0 and are not valid).
        readout: concept projections at one residual index for every prompt and generated token.
        on_readings(positions [B, n], readings [B, n, C]): called with readings while decoding continues
        (the prompt's first, then every `stream_chunk` generated tokens; positions -1 = nothing there).
        """
        cfg, mesh = self.lm.config, self.lm.mesh
        tokens, mask = self.lm.check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        lengths = mask.sum(axis=1)
        check_positions(cfg, lengths, max_new_tokens, self.config.beyond_max_positions)
        P = bucket(int(lengths.max()), self.config.prompt_buckets, "a prompt")
        n_new = bucket(max_new_tokens, self.config.new_token_buckets, "max_new_tokens")
        # Right-align the real tokens into P columns (left padding), whatever padding the input had.
        toks, pmask = left_pad([tokens[b][mask[b].astype(bool)] for b in range(B)], P, pad_id)
        if sampling is not None and sampling.temperature.shape != (B,):
            raise InputError(f"sampling is for batch {sampling.temperature.shape[0]}, tokens for {B}")
        if interventions is not None:
            interventions.check(cfg.n_layers, cfg.d_model, B)
            interventions = _align_patch(interventions, mask, P)
        if readout is not None:
            self._check_readout(readout)
            readout = readout.replace(concepts=np.asarray(readout.concepts, np.float32),
                                      index=np.int32(readout.index))
        stops = np.asarray(list(stop_tokens), np.int32).reshape(-1)
        n_slots = max(1, -(-stops.size // self.config.stop_slots)) * self.config.stop_slots
        stops = np.pad(stops, (0, n_slots - stops.size), constant_values=-1)
        key = jax.random.key(0) if key is None else key

        pad = -B % batch_multiple(mesh)
        if pad:  # rows without tokens generate nothing and are dropped below
            toks, pmask = np.pad(toks, ((0, pad), (0, 0))), np.pad(pmask, ((0, pad), (0, 0)))
            if sampling is not None:
                sampling = jax.tree.map(lambda a: np.pad(np.asarray(a), (0, pad)), sampling)
            if interventions is not None:
                interventions = interventions.padded(pad)
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        toks, pmask = jax.device_put(toks, batch), jax.device_put(pmask, batch)

        self._sink = on_readings
        with self.lm._precision():
            out = self._jitted(self.lm.params, toks, pmask, np.int32(max_new_tokens), stops, sampling, key,
                               None if interventions is None else interventions.as_device(), readout,
                               n_new=n_new, return_logits=return_logits, stream=on_readings is not None)
            if on_readings is not None:  # the loop runs asynchronously: wait for its last callbacks
                jax.block_until_ready(out)
                jax.effects_barrier()
        self._sink = None
        if pad:
            out = jax.tree.map(lambda a: a[:B], out)
        return out

    def _check_readout(self, readout: Readout) -> None:
        cfg = self.lm.config
        if np.ndim(readout.index) != 0 or not 0 <= int(readout.index) <= cfg.n_layers:
            raise InputError(f"readout index {readout.index} is outside 0..{cfg.n_layers}")
        if np.ndim(readout.concepts) != 2 or np.shape(readout.concepts)[1] != cfg.d_model:
            raise InputError(f"readout concepts must be [C, d_model={cfg.d_model}], got {np.shape(readout.concepts)}")

    def _emit(self, positions, readings):
        if self._sink is not None:
            self._sink(np.asarray(positions), np.asarray(readings))

    # -- device side -------------------------------------------------------------------------------------------

    def _decode(self, params, prompt_BP, mask_BP, max_new, stops_Z, sampling, key, iv, readout, *, n_new: int,
                return_logits: bool, stream: bool) -> Generation:
        self.trace_count += 1  # runs only while tracing
        lm, cfg, mesh = self.lm, self.lm.config, self.lm.mesh
        model = nnx.merge(lm.graphdef, params)
        L = cfg.n_layers
        B, P = prompt_BP.shape
        S = P + n_new
        segments = layer_segments(L, () if iv is None else iv.static_indices, self.config.unroll_layers)
        layer_states = model.split_layers(segments)  # sliced once, outside the loop
        step_iv = None if iv is None else iv.replace(patch=None)  # a patch covers the prompt's columns only
        read_index = None if readout is None else readout.index

        def forward(tokens_BT, positions_BT, gen, key_valid_BS, cache, start, iv, rope=None):
            """One cached pass: logits of its last column [B, V], readings [B, T, C] (or None), the cache."""
            out = model(tokens_BT, key_valid_BS, interventions=iv, generated_BT=jnp.full(tokens_BT.shape, gen),
                        mesh=mesh, logits="last", kernel=lm.kernel, cache=cache, start=start,
                        positions_BT=positions_BT, layer_states=layer_states, read_index=read_index, rope=rope)
            return out.logits, None if readout is None else readout(out.read), out.cache

        # Prefill: the prompt's P columns, attending among themselves.
        prompt_len_B = jnp.sum(mask_BP, axis=1).astype(jnp.int32)
        valid_BP = mask_BP.astype(bool)
        positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0).astype(jnp.int32)
        cache = KVCache.empty(cfg, segments, B, S, lm.dtype, single_unstacked=True)
        logits_BV, reads_BPC, cache = forward(prompt_BP, positions_BP, 0.0, valid_BP, cache, 0, iv)
        # The rotary tables of every cache column's position, computed once (see Transformer.__call__'s `rope`).
        rope_table = model.rope(jnp.arange(S, dtype=jnp.int32)[None, :])
        tokens = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt_BP)
        valid = jnp.zeros((B, S), bool).at[:, :P].set(valid_BP)

        readings = chunk = chunk_pos = chunk_fill = None
        if readout is not None:
            C = readout.concepts.shape[0]
            readings = jnp.zeros((B, S, C), jnp.float32).at[:, :P].set(jnp.where(valid_BP[..., None], reads_BPC, 0))
            if stream:
                jax.debug.callback(self._emit, jnp.where(valid_BP, positions_BP, -1), readings[:, :P], ordered=True)
                n = self.config.stream_chunk
                chunk, chunk_pos, chunk_fill = jnp.zeros((B, n, C), jnp.float32), jnp.full((B, n), -1), jnp.int32(0)
        logits = jnp.zeros((B, n_new, logits_BV.shape[-1]), jnp.float32) if return_logits else None
        state = _State(step=jnp.int32(0), tokens=tokens, valid=valid, go=(prompt_len_B > 0) & (max_new >= 1),
                       n_generated=jnp.zeros((B,), jnp.int32), next_logits=logits_BV, cache=cache, key=key,
                       readings=readings, logits=logits, chunk=chunk, chunk_pos=chunk_pos, chunk_fill=chunk_fill)

        def cond(s: _State):
            return (s.step < n_new) & jnp.any(s.go)

        def body(s: _State) -> _State:
            # Choose token j from the logits of the previous pass, then feed it (its readings, the next logits).
            # The last feed of a generation without a readout is not needed; running it keeps one `choose`.
            col = P + s.step
            key, sub = jax.random.split(s.key)
            real_B = s.go
            if sampling is None:
                chosen_B = greedy(s.next_logits)
            else:
                chosen_B = choose(s.next_logits, sub, sampling)
            token_B = jnp.where(real_B, chosen_B, 0)
            tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token_B, col, 1)
            valid = jax.lax.dynamic_update_index_in_dim(s.valid, real_B, col, 1)
            n_generated = s.n_generated + real_B
            stopped_B = jnp.any(token_B[:, None] == stops_Z[None, :], axis=1)
            pos_B = prompt_len_B + s.step
            rope = None if rope_table[0] is None else tuple(
                jnp.take(t[:, 0], pos_B, axis=1)[:, :, None] for t in rope_table)
            logits_BV, reads_B1C, cache = forward(token_B[:, None], pos_B[:, None], 1.0, valid, s.cache, col,
                                                  step_iv, rope)
            out = dict(step=s.step + 1, tokens=tokens, valid=valid, go=real_B & ~stopped_B & (n_generated < max_new),
                       n_generated=n_generated, next_logits=logits_BV, cache=cache, key=key)
            if return_logits:
                out["logits"] = jax.lax.dynamic_update_index_in_dim(s.logits, s.next_logits, s.step, 1)
            if readout is not None:
                reads_B1C = jnp.where(real_B[:, None, None], reads_B1C, 0.0)
                out["readings"] = jax.lax.dynamic_update_slice_in_dim(s.readings, reads_B1C, col, 1)
                if stream:
                    chunk = jax.lax.dynamic_update_slice_in_dim(s.chunk, reads_B1C, s.chunk_fill, 1)
                    chunk_pos = jax.lax.dynamic_update_slice_in_dim(
                        s.chunk_pos, jnp.where(real_B, pos_B, -1)[:, None], s.chunk_fill, 1)
                    full = s.chunk_fill + 1 == chunk.shape[1]
                    out["chunk_fill"] = jnp.where(full, 0, s.chunk_fill + 1)
                    out["chunk"], out["chunk_pos"] = chunk, jax.lax.cond(full, self._flush, lambda p, c: p,
                                                                         chunk_pos, chunk)
            return s.replace(**out)

        state = jax.lax.while_loop(cond, body, state)
        if stream:
            fill = state.chunk_fill
            pending = jnp.where(jnp.arange(state.chunk_pos.shape[1])[None, :] < fill, state.chunk_pos, -1)
            jax.lax.cond(fill > 0, self._flush, lambda p, c: p, pending, state.chunk)
        return Generation(tokens=state.tokens, valid=state.valid, n_generated=state.n_generated,
                          readings=state.readings, logits=state.logits, prompt_columns=P)

    def _flush(self, positions, readings):
        """Sends a chunk of readings to the host; returns a cleared positions buffer."""
        jax.debug.callback(self._emit, positions, readings, ordered=True)
        return jnp.full_like(positions, -1)


def _align_patch(iv: Interventions, mask_BT: np.ndarray, P: int) -> Interventions:
    """A patch given for the prompt tokens as passed, moved to the decode loop's P left-padded prompt columns."""
    if iv.patch is None:
        return iv
    B, T = mask_BT.shape
    values = np.broadcast_to(np.asarray(iv.patch.values, np.float32), (B, T, iv.d_model))
    weights = np.broadcast_to(np.asarray(iv.patch.mask, np.float32), (B, T))
    vals_BPD, mask_BP = np.zeros((B, P, iv.d_model), np.float32), np.zeros((B, P), np.float32)
    for b in range(B):
        real = mask_BT[b].astype(bool)
        n = int(real.sum())
        vals_BPD[b, P - n:], mask_BP[b, P - n:] = values[b][real], weights[b][real]
    return iv.replace(patch=iv.patch.replace(values=vals_BPD, mask=mask_BP))
