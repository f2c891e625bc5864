"""The serving engine's device side (emojax.serve.engine): the state of every slot and the two programs over it.

`Slots` holds N slots of S columns: each slot's KV cache row, valid columns, next-token logits, length, tokens
generated, whether it generates and its PRNG key chain. `SlotPrograms.prefill` puts one prompt into one slot;
`SlotPrograms.chunk` runs up to chunk_steps decode steps of every slot in one `lax.while_loop`. Both are pure
functions of (params, state, per-slot arrays), jitted by the engine with the state donated; per-call values are
arguments, so they compile once (chunk) or once per prompt bucket (prefill), as the trace counts show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from emojax.models.config import ModelConfig
from emojax.models.lm import LanguageModel
from emojax.models.transformer import KVCache
from emojax.steer.sampling import Sampling, choose, greedy


@struct.dataclass
class Slots:
    """Device state of every slot: N slots, S = max_context columns (column = token position)."""

    k: tuple[jax.Array, ...]  # per layer segment [N, Ls, K, H, S]
    v: tuple[jax.Array, ...]  # per layer segment [N, Ls, K, S, H]
    valid: jax.Array  # [N, S] bool: the slot's real tokens
    next_logits: jax.Array  # [N, V] the logits the slot's next token is chosen from
    length: jax.Array  # [N] int32: tokens in the slot (its next token's column and position)
    n_generated: jax.Array  # [N] int32: tokens the slot's request has generated
    go: jax.Array  # [N] bool: the slot generates at its next step
    key_data: jax.Array  # [N, 2] uint32: each slot's PRNG key chain (advanced once per generated token)

    @classmethod
    def empty(cls, cfg: ModelConfig, segments, N: int, S: int, dtype) -> Slots:
        """N free slots of S columns; the cache slot-major, so that a slot's row is contiguous."""
        cache = KVCache.empty(cfg, segments, N, S, dtype)
        return cls(k=tuple(jnp.swapaxes(a, 0, 1) for a in cache.k), v=tuple(jnp.swapaxes(a, 0, 1) for a in cache.v),
                   valid=jnp.zeros((N, S), bool), next_logits=jnp.zeros((N, cfg.vocab_size), jnp.float32),
                   length=jnp.zeros((N,), jnp.int32), n_generated=jnp.zeros((N,), jnp.int32),
                   go=jnp.zeros((N,), bool), key_data=jnp.zeros((N, 2), jnp.uint32))


class SlotPrograms:
    """The engine's two programs for `lm` with decoding's layer `segments` (see DecodeConfig); counts its traces."""

    def __init__(self, lm: LanguageModel, segments, chunk_steps: int):
        self.lm, self.segments, self.chunk_steps = lm, segments, chunk_steps
        self.chunk_trace_count = 0  # times the chunk step was traced (= compiled); tests read it
        self.prefill_trace_count = 0  # times a prefill was traced: once per prompt bucket

    def prefill(self, params, state: Slots, slot, prompt_P, n, strengths_E, seed, consts):
        """The prompt prompt_P [P] (n real tokens, then padding) through the model into slot `slot`'s cache row;
        its first token's logits, length, key. Returns the state and the prompt's readings [P, C]."""
        self.prefill_trace_count += 1  # runs only while tracing
        lm, cfg = self.lm, self.lm.config
        readout, steer = consts
        model = nnx.merge(lm.graphdef, params)
        P = prompt_P.shape[0]
        valid_P = jnp.arange(P) < n
        cache = KVCache.empty(cfg, self.segments, 1, P, lm.dtype)
        out = model(prompt_P[None], valid_P[None], capture=(cfg.n_layers,), interventions=steer.replace(
                    strengths=strengths_E[None]), generated_BT=jnp.zeros((1, P)), mesh=lm.mesh, logits=False,
                    kernel=lm.kernel, cache=cache, start=0, positions_BT=jnp.arange(P, dtype=jnp.int32)[None],
                    layer_states=model.split_layers(self.segments), read_index=readout.index)
        # The first token's logits: the decode loop's unembedding of the last real prompt column.
        logits_V = model.unembed(jax.lax.dynamic_index_in_dim(out.hidden[0][0], n - 1, 0, keepdims=False))
        S = state.valid.shape[1]
        state = state.replace(
            k=tuple(jax.lax.dynamic_update_slice(a, r.swapaxes(0, 1).astype(a.dtype), (slot, 0, 0, 0, 0))
                    for a, r in zip(state.k, out.cache.k)),
            v=tuple(jax.lax.dynamic_update_slice(a, r.swapaxes(0, 1).astype(a.dtype), (slot, 0, 0, 0, 0))
                    for a, r in zip(state.v, out.cache.v)),
            valid=state.valid.at[slot].set(jnp.arange(S) < n), next_logits=state.next_logits.at[slot].set(logits_V),
            length=state.length.at[slot].set(n), n_generated=state.n_generated.at[slot].set(0),
            go=state.go.at[slot].set(True),
            key_data=state.key_data.at[slot].set(jax.random.key_data(jax.random.key(seed))))
        return state, readout(out.read)[0]

    def chunk(self, params, state: Slots, active_N, strengths_NE, sampling: Sampling, stops_NZ, max_new_N,
                  consts):
        """Up to chunk_steps decode steps of every slot. Returns the state and (tokens [N, K], readings [N, K, C],
        emitted [N, K]) for K = chunk_steps; emitted marks the steps where a slot generated."""
        self.chunk_trace_count += 1  # runs only while tracing
        lm = self.lm
        readout, steer = consts
        model = nnx.merge(lm.graphdef, params)
        layer_states = model.split_layers(self.segments)  # sliced once, outside the loop
        N, S = state.valid.shape
        K, C = self.chunk_steps, readout.concepts.shape[0]

        def slot_forward(token, col, valid_S, k, v, strengths_E):
            """One slot's cached pass of one token at column (= position) col: the decode loop's model call."""
            cache = KVCache(k=tuple(a[:, None] for a in k), v=tuple(a[:, None] for a in v), segments=self.segments)
            out = model(token[None, None], valid_S[None], interventions=steer.replace(strengths=strengths_E[None]),
                        generated_BT=jnp.ones((1, 1)), mesh=None, logits="last", kernel=lm.kernel, cache=cache,
                        start=col, positions_BT=col[None, None], layer_states=layer_states,
                        read_index=readout.index)
            return (out.logits[0], readout(out.read)[0, 0], tuple(a[:, 0] for a in out.cache.k),
                    tuple(a[:, 0] for a in out.cache.v))

        def slot_choose(logits_V, key, t, k, p, seed):
            """choose() for one slot, as Decoder's batch-1 loop calls it."""
            return choose(logits_V[None], key, Sampling(t[None], k[None], p[None], seed[None]))[0]

        def body(carry):
            step, s, tokens_NK, readings_NKC, emitted_NK = carry
            pairs = jax.vmap(jax.random.split)(jax.random.wrap_key_data(s.key_data))  # [N, 2]: (next key, draw key)
            chosen = jax.lax.cond(  # the sort of sampling runs only while some slot samples
                jnp.any(s.go & (sampling.temperature > 0)),
                lambda: jax.vmap(slot_choose)(s.next_logits, pairs[:, 1], sampling.temperature, sampling.top_k,
                                              sampling.top_p, sampling.seed),
                lambda: greedy(s.next_logits))
            token = jnp.where(s.go, chosen, 0)
            valid = s.valid | (s.go[:, None] & (jnp.arange(S)[None, :] == s.length[:, None]))
            logits, reads_NC, k, v = jax.vmap(slot_forward)(token, s.length, valid, s.k, s.v, strengths_NE)
            n_generated = s.n_generated + s.go
            stopped = jnp.any(token[:, None] == stops_NZ, axis=1)
            new = s.replace(k=k, v=v, valid=valid, next_logits=jnp.where(s.go[:, None], logits, s.next_logits),
                            length=s.length + s.go, n_generated=n_generated,
                            go=s.go & ~stopped & (n_generated < max_new_N),
                            key_data=jnp.where(s.go[:, None], jax.random.key_data(pairs[:, 0]), s.key_data))
            return (step + 1, new, tokens_NK.at[:, step].set(token), readings_NKC.at[:, step].set(reads_NC),
                    emitted_NK.at[:, step].set(s.go))

        def cond(carry):
            return (carry[0] < K) & jnp.any(carry[1].go)

        carry = (jnp.int32(0), state.replace(go=state.go & active_N), jnp.zeros((N, K), jnp.int32),
                 jnp.zeros((N, K, C), jnp.float32), jnp.zeros((N, K), bool))
        _, state, tokens_NK, readings_NKC, emitted_NK = jax.lax.while_loop(cond, body, carry)
        return state, (tokens_NK, readings_NKC, emitted_NK)
