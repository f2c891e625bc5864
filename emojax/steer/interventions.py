"""Interventions on the residual stream during generation: structure is static, every value is an array.

    iv = (Interventions.empty(batch=B, n_layers=L, d_model=D)
          .add(v_D, layers=(6,), strengths=s_B, positions="generated")    # x += s_b * v at index 6
          .ablate(u_D, layers=(6, 7))                                      # x -= (x . u) u
          .clamp_sae(sae, index=6, latents=[123], values=[[4.0]] * B))      # SAE latent 123 := 4, error kept

Changing strengths, vectors, directions or clamp values never recompiles the decode loop; changing how many
vectors, directions or clamped latents there are (array shapes), or the SAE's index and activation (static
fields), does. Residual indices follow `lm(..., capture=...)`: 0 = embeddings, i = output of layer i - 1,
and steering at index i acts where a read at index i reads (the Steering semantics of emojax.models).

At one residual index the order is: additive vectors, then ablation, then the SAE clamp (only at its index).
Positions: "prompt" (the prompt's columns), "generated" (every generated token's column) or "all".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from emojax.concepts.bank import ConceptBank
from emojax.errors import InputError

Positions = Literal["prompt", "generated", "all"]
_WHERE = {"prompt": (1.0, 0.0), "generated": (0.0, 1.0), "all": (1.0, 1.0)}


def position_weights(positions: str) -> tuple[float, float]:
    """(weight on prompt columns, weight on generated columns) of a positions name."""
    if positions not in _WHERE:
        raise InputError(f"positions must be one of {sorted(_WHERE)}, got {positions!r}")
    return _WHERE[positions]


@dataclasses.dataclass(frozen=True)
class SaeSpec:
    """Structure of an SAE clamp: the residual index it reads and writes, and its encoder activation."""

    index: int
    activation: Literal["topk", "relu"] = "topk"
    k: int = 32  # TopK only


@struct.dataclass
class SaeClamp:
    """Sets chosen SAE latents to given values, keeping the SAE's error term.

    Encoder: f = act(x @ W_enc + b_enc) (fold a decoder-bias centring into b_enc: b_enc - b_dec @ W_enc);
    decoder: x_hat = f @ W_dec + b_dec. The stream becomes x + (f' - f) @ W_dec, where f' is f with the
    clamped latents replaced; that is x_hat(f') + (x - x_hat(f)): the reconstruction error is preserved.

    W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]; latents [M] int32; values [B, M]; where [2].
    """

    W_enc: jax.Array
    b_enc: jax.Array
    W_dec: jax.Array
    b_dec: jax.Array
    latents: jax.Array
    values: jax.Array
    where: jax.Array
    spec: SaeSpec = struct.field(pytree_node=False)

    def encode(self, x_BTD: jax.Array) -> jax.Array:
        """Latent activations f [B, T, F] (float32)."""
        pre = jnp.einsum("BTD,DF->BTF", x_BTD.astype(jnp.float32), self.W_enc.astype(jnp.float32))
        pre = jax.nn.relu(pre + self.b_enc.astype(jnp.float32))
        if self.spec.activation == "relu":
            return pre
        from emojax.sae.variants.base import keep_top_k  # the SAE trainer's selection (no import at start-up)

        k = self.spec.k
        return keep_top_k(pre.reshape(-1, pre.shape[-1]), jnp.int32(k), k).reshape(pre.shape)

    def decode(self, f_BTF: jax.Array) -> jax.Array:
        return jnp.einsum("BTF,FD->BTD", f_BTF, self.W_dec.astype(jnp.float32)) + self.b_dec.astype(jnp.float32)

    def apply(self, x_BTD: jax.Array, gen_BT: jax.Array) -> jax.Array:
        f = self.encode(x_BTD)
        current_BTM = jnp.take(f, self.latents, axis=-1)
        weight_BT = self.where[0] * (1.0 - gen_BT) + self.where[1] * gen_BT
        change_BTM = (self.values.astype(jnp.float32)[:, None, :] - current_BTM) * weight_BT[..., None]
        rows_MD = jnp.take(self.W_dec.astype(jnp.float32), self.latents, axis=0)
        delta = jnp.einsum("BTM,MD->BTD", change_BTM, rows_MD)
        return (x_BTD.astype(jnp.float32) + delta).astype(x_BTD.dtype)


@struct.dataclass
class Interventions:
    """All interventions of one batch, as arrays.

    vectors   [V, L + 1, D]  additive directions; row i acts at residual index i (zero rows: nothing)
    strengths [B, V]         per-example multiplier of each vector (a sweep is a batch)
    where     [V, 2]         weight of each vector on prompt / generated columns
    ablate    [A, L + 1, D]  directions projected out at each index (orthonormal per index; zero rows: none)
    ablate_where [A, 2]
    sae       an SaeClamp or None
    """

    vectors: jax.Array
    strengths: jax.Array
    where: jax.Array
    ablate_dirs: jax.Array
    ablate_where: jax.Array
    sae: SaeClamp | None = None

    @classmethod
    def empty(cls, batch: int, n_layers: int, d_model: int) -> Interventions:
        L1 = n_layers + 1
        return cls(vectors=np.zeros((0, L1, d_model), np.float32), strengths=np.zeros((batch, 0), np.float32),
                   where=np.zeros((0, 2), np.float32), ablate_dirs=np.zeros((0, L1, d_model), np.float32),
                   ablate_where=np.zeros((0, 2), np.float32))

    @property
    def batch(self) -> int:
        return int(self.strengths.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[1]) - 1

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[2])

    def _rows(self, vector, layers: Sequence[int]) -> np.ndarray:
        v = np.asarray(vector, np.float32)
        if v.shape != (self.d_model,):
            raise InputError(f"a direction must be [d_model={self.d_model}], got shape {v.shape}")
        rows = np.zeros((self.n_layers + 1, self.d_model), np.float32)
        for i in layers:
            if not 0 <= int(i) <= self.n_layers:
                raise InputError(f"residual index {i} is outside 0..{self.n_layers}")
            rows[int(i)] = v
        return rows

    def add(self, vector, layers: Sequence[int], strengths=1.0, positions: Positions = "all") -> Interventions:
        """x += strengths[b] * vector at the residual `layers`, on `positions`. strengths: scalar or [B]."""
        s = np.broadcast_to(np.asarray(strengths, np.float32), (self.batch,)) if np.ndim(strengths) == 0 \
            else np.asarray(strengths, np.float32)
        if s.shape != (self.batch,):
            raise InputError(f"strengths must be a scalar or [batch={self.batch}], got shape {s.shape}")
        return self.replace(
            vectors=np.concatenate([np.asarray(self.vectors), self._rows(vector, layers)[None]]),
            strengths=np.concatenate([np.asarray(self.strengths), s[:, None]], axis=1),
            where=np.concatenate([np.asarray(self.where), np.asarray([position_weights(positions)], np.float32)]),
        )

    def ablate(self, direction, layers: Sequence[int], positions: Positions = "all") -> Interventions:
        """Projects `direction` out of the stream at the residual `layers`: x -= (x . u) u, u = unit direction.

        Several directions at one index are orthonormalised against the ones added before (Gram-Schmidt), so
        their span is removed.
        """
        u = np.asarray(direction, np.float32)
        rows = self._rows(u, layers)
        previous = np.asarray(self.ablate_dirs)
        for i in layers:
            r = rows[int(i)].astype(np.float64)
            for p in previous[:, int(i)]:
                r = r - (r @ p) * p
            norm = np.linalg.norm(r)
            if norm < 1e-6:
                raise InputError(f"ablation direction at index {i} is zero or in the span of earlier ones")
            rows[int(i)] = (r / norm).astype(np.float32)
        return self.replace(
            ablate_dirs=np.concatenate([previous, rows[None]]),
            ablate_where=np.concatenate([np.asarray(self.ablate_where),
                                         np.asarray([position_weights(positions)], np.float32)]),
        )

    def clamp_sae(self, W_enc, b_enc, W_dec, b_dec, *, index: int, latents: Sequence[int], values,
                  activation: Literal["topk", "relu"] = "topk", k: int = 32,
                  positions: Positions = "all") -> Interventions:
        """Clamps SAE latents `latents` [M] to `values` ([M] or [B, M]) at residual `index` (1..L-1)."""
        if self.sae is not None:
            raise InputError("one SAE clamp per generation")
        if not 0 <= int(index) < self.n_layers:
            raise InputError(f"SAE index {index} is outside 0..{self.n_layers - 1}")
        W_enc, W_dec = np.asarray(W_enc, np.float32), np.asarray(W_dec, np.float32)
        D = self.d_model
        if W_enc.ndim != 2 or W_enc.shape[0] != D or W_dec.shape != W_enc.shape[::-1]:
            raise InputError(f"SAE weights must be W_enc [d_model={D}, F] and W_dec [F, d_model], got "
                             f"{W_enc.shape} and {W_dec.shape}")
        F = W_enc.shape[1]
        latents = np.asarray(latents, np.int32).reshape(-1)
        if latents.size and (latents.min() < 0 or latents.max() >= F):
            raise InputError(f"SAE latents must be in [0, {F}), got {latents.tolist()}")
        values = np.broadcast_to(np.asarray(values, np.float32), (self.batch, latents.size))
        if activation not in ("topk", "relu"):
            raise InputError(f"SAE activation must be 'topk' or 'relu', got {activation!r}")
        if activation == "topk" and not 0 < k <= F:
            raise InputError(f"TopK k must be in 1..{F}, got {k}")
        clamp = SaeClamp(W_enc=W_enc, b_enc=np.asarray(b_enc, np.float32).reshape(F), W_dec=W_dec,
                         b_dec=np.asarray(b_dec, np.float32).reshape(D), latents=latents, values=np.array(values),
                         where=np.asarray(position_weights(positions), np.float32),
                         spec=SaeSpec(index=int(index), activation=activation, k=int(k)))
        return self.replace(sae=clamp)

    def apply(self, index, x_BTD: jax.Array, gen_BT: jax.Array) -> jax.Array:
        """Additive vectors and ablation at residual `index` (an int or a traced scalar).

        gen_BT: 1.0 on generated columns, 0.0 on prompt columns.
        """
        if self.vectors.shape[0]:
            vecs_VD = self.vectors[:, index].astype(jnp.float32)
            where_BTV = self.where[:, 0] * (1.0 - gen_BT[..., None]) + self.where[:, 1] * gen_BT[..., None]
            coef_BTV = self.strengths.astype(jnp.float32)[:, None, :] * where_BTV
            delta = jnp.einsum("BTV,VD->BTD", coef_BTV, vecs_VD)
            x_BTD = x_BTD + delta.astype(x_BTD.dtype)
        if self.ablate_dirs.shape[0]:
            u_AD = self.ablate_dirs[:, index].astype(jnp.float32)
            where_BTA = (self.ablate_where[:, 0] * (1.0 - gen_BT[..., None])
                         + self.ablate_where[:, 1] * gen_BT[..., None])
            coef_BTA = jnp.einsum("BTD,AD->BTA", x_BTD.astype(jnp.float32), u_AD) * where_BTA
            x_BTD = (x_BTD.astype(jnp.float32) - jnp.einsum("BTA,AD->BTD", coef_BTA, u_AD)).astype(x_BTD.dtype)
        return x_BTD

    def as_device(self) -> Interventions:
        return jax.tree.map(jnp.asarray, self)


def bank_direction(bank: ConceptBank, concept: str, layer: int, unit: Literal["norm", "absolute"]) -> np.ndarray:
    """The vector that strength 1 adds: in "norm" units the unit direction times the layer's mean residual
    norm (strength 0.05 = 5% of the typical stream norm, the study's unit); "absolute" the bank vector as is."""
    v = bank.vector(concept, layer)
    if unit == "absolute":
        return np.asarray(v, np.float32)
    if unit != "norm":
        raise InputError(f"unit must be 'norm' or 'absolute', got {unit!r}")
    norm = float(np.linalg.norm(v))
    if norm == 0:
        raise InputError(f"concept {concept!r} has a zero vector at layer {layer}")
    return (v / norm * float(bank.resid_norm[bank.layer_index(layer)])).astype(np.float32)


def default_layer(bank: ConceptBank, n_layers: int) -> int:
    """The bank layer nearest two-thirds of the depth (where the study did most of its analyses)."""
    return min(bank.layers, key=lambda i: (abs(i - 2 * n_layers / 3), i))


def from_bank(bank: ConceptBank, n_layers: int, concepts: Sequence[str], strengths, *,
              layers: Sequence[int] | None = None, positions: Positions = "all",
              unit: Literal["norm", "absolute"] = "norm") -> Interventions:
    """Additive steering by bank concepts. strengths [B, V] (one column per concept) or [V] for batch 1.

    layers: residual indices (each must be in the bank; default: `default_layer`); every concept is added at
    every listed layer with its strength there measured in that layer's unit.
    """
    s = np.asarray(strengths, np.float32)
    if s.ndim == 1:
        s = s[None]
    if s.ndim != 2 or s.shape[1] != len(concepts):
        raise InputError(f"strengths must be [batch, {len(concepts)} concepts], got shape {s.shape}")
    layers = tuple(layers) if layers else (default_layer(bank, n_layers),)
    for i in layers:
        bank.layer_index(i)
        if not 0 <= i <= n_layers:
            raise InputError(f"residual index {i} is outside 0..{n_layers}")
    iv = Interventions.empty(s.shape[0], n_layers, bank.d_model)
    for c, name in enumerate(concepts):
        bank.concept_index(name)
        # one vector per (concept, layer): the unit differs by layer in "norm" units
        for i in layers:
            iv = iv.add(bank_direction(bank, name, i, unit), layers=(i,), strengths=s[:, c], positions=positions)
    return iv
