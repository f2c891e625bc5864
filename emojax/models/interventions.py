"""The one intervention vocabulary of the forward pass, the activation dump and the decode loop.

    iv = (Interventions.empty(batch=B, n_layers=L, d_model=D)
          .add(v_D, layers=(6,), strengths=s_B, positions="generated")  # x += s_b * v at index 6
          .ablate(u_D, layers=(6, 7))                                    # x -= (x . u - mean) u  (mean 0: project out)
          .patch_at(values_BTD, index=4)                                 # x := values at index 4
          .clamp_sae(sae, index=6, latents=[123], values=[[4.0]] * B))   # SAE latent 123 := 4, error term kept

    lm(tokens, mask, capture=(6,), interventions=iv)          # forward (and the dump's batches)
    Decoder(lm).generate(tokens, mask, interventions=iv)      # decode

Structure is static, every value is an array: changing strengths, vectors, directions, means, patch values or
clamp values never recompiles; changing how many vectors, directions or clamped latents there are (array
shapes), or the patch's or the SAE clamp's index, does. Residual indices follow `lm(..., capture=...)`: 0 =
embeddings, i = output of layer i - 1, L = the last layer's output (adds and ablations act before the final
norm, a patch at L replaces the normed stream the unembedding reads); an intervention at index i acts where a
read at index i reads.

At one index the order is: additive vectors, ablation, the SAE clamp, the patch. Positions: "prompt" (the
prompt's columns), "generated" (decode's generated columns; in a forward pass, the columns marked in its
`generated` mask) or "all". Interventions built for batch 1 apply to every row of any batch (a dump).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from emojax.digest import arrays_digest
from emojax.errors import InputError

Positions = Literal["prompt", "generated", "all"]
_WHERE = {"prompt": (1.0, 0.0), "generated": (0.0, 1.0), "all": (1.0, 1.0)}


def position_weights(positions: str) -> tuple[float, float]:
    """(weight on prompt columns, weight on generated columns) of a positions name."""
    if positions not in _WHERE:
        raise InputError(f"positions must be one of {sorted(_WHERE)}, got {positions!r}")
    return _WHERE[positions]


def _on(where: jax.Array, gen_BT: jax.Array) -> jax.Array:
    """[B, T, E] (or [B, T, A]): each vector's (or direction's) weight at each column, prompt or generated."""
    return where[:, 0] * (1.0 - gen_BT[..., None]) + where[:, 1] * gen_BT[..., None]


@struct.dataclass
class SaeClamp:
    """Sets chosen latents of a trained SAE (emojax.sae.Sae, any variant) to given values, keeping its error term.

    The SAE encodes the stream with its own variant (TopK, BatchTopK's threshold, JumpReLU's thresholds, ReLU)
    and its own input scale and decoder-bias centring; the stream becomes x + (f' - f)[latents] @ W_dec / scale,
    f' being f with the clamped latents replaced: the clamped reconstruction plus the untouched error x - x_hat(f).

    params / stats: the SAE's arrays; latents [M] int32; values [B, M]; where [2] (prompt, generated weights).
    """

    params: dict
    stats: dict
    k: jax.Array
    input_scale: jax.Array
    latents: jax.Array
    values: jax.Array
    where: jax.Array
    variant: Any = struct.field(pytree_node=False)  # the SAE's variant (hashable: part of the compile key)
    index: int = struct.field(pytree_node=False)

    def apply(self, x_BTD: jax.Array, gen_BT: jax.Array) -> jax.Array:
        B, T, D = x_BTD.shape
        flat_BD = x_BTD.reshape(B * T, D).astype(jnp.float32) * self.input_scale  # the B * T tokens: one SAE batch
        hyper = {"k": self.k, "coeff": jnp.zeros((), jnp.float32)}
        f_BTF = self.variant.encode(self.params, self.stats, flat_BD, hyper).reshape(B, T, -1)
        current_BTM = jnp.take(f_BTF, self.latents, axis=-1)
        change_BTM = (self.values.astype(jnp.float32)[:, None, :] - current_BTM) * _on(self.where[None], gen_BT)
        rows_MD = jnp.take(self.params["W_dec"].astype(jnp.float32), self.latents, axis=0) / self.input_scale
        return (x_BTD.astype(jnp.float32) + jnp.einsum("BTM,MD->BTD", change_BTM, rows_MD)).astype(x_BTD.dtype)


@struct.dataclass
class Patch:
    """Replaces the stream at one residual index with given values where `mask` is 1.

    values [B, T, D] (aligned with the tokens given to the forward or to decode's prompt); mask [B, T].
    """

    values: jax.Array
    mask: jax.Array
    index: int = struct.field(pytree_node=False)

    def apply(self, x_BTD: jax.Array) -> jax.Array:
        m = self.mask.astype(jnp.float32)[..., None]
        return (x_BTD.astype(jnp.float32) * (1.0 - m) + self.values.astype(jnp.float32) * m).astype(x_BTD.dtype)


@struct.dataclass
class Interventions:
    """All interventions of one batch, as arrays.

    vectors   [E, L + 1, D]  additive directions; row i acts at residual index i (zero rows: nothing)
    strengths [B, E]         per-example multiplier of each vector (a sweep is a batch; B = 1 broadcasts)
    where     [E, 2]         weight of each vector on prompt / generated columns
    ablate_dirs  [A, L + 1, D]  unit directions projected out at each index (orthonormal per index; zero rows: none)
    ablate_means [A, L + 1]     the projection each ablated direction is set to (0: projected out)
    ablate_where [A, 2]
    patch     a Patch or None;  sae  an SaeClamp or None
    """

    vectors: jax.Array
    strengths: jax.Array
    where: jax.Array
    ablate_dirs: jax.Array
    ablate_means: jax.Array
    ablate_where: jax.Array
    patch: Patch | None = None
    sae: SaeClamp | None = None

    @classmethod
    def empty(cls, batch: int, n_layers: int, d_model: int) -> Interventions:
        L1 = n_layers + 1
        return cls(vectors=np.zeros((0, L1, d_model), np.float32), strengths=np.zeros((batch, 0), np.float32),
                   where=np.zeros((0, 2), np.float32), ablate_dirs=np.zeros((0, L1, d_model), np.float32),
                   ablate_means=np.zeros((0, L1), np.float32), ablate_where=np.zeros((0, 2), np.float32))

    @property
    def batch(self) -> int:
        return int(self.strengths.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[1]) - 1

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[2])

    @property
    def static_indices(self) -> tuple[int, ...]:
        """Residual indices where a static intervention acts (the SAE clamp, the patch): layer segments end there."""
        return tuple(sorted({iv.index for iv in (self.sae, self.patch) if iv is not None}))

    def _rows(self, vector, layers: Sequence[int]) -> np.ndarray:
        v = np.asarray(vector, np.float32)
        if v.shape != (self.d_model,):
            raise InputError(f"a direction must be [d_model={self.d_model}], got shape {v.shape}")
        rows = np.zeros((self.n_layers + 1, self.d_model), np.float32)
        for i in layers:
            self._check_index(i)
            rows[int(i)] = v
        return rows

    def _check_index(self, i, hi: int | None = None) -> None:
        hi = self.n_layers if hi is None else hi
        if not 0 <= int(i) <= hi:
            raise InputError(f"residual index {i} is outside 0..{hi}")

    def _per_row(self, values, name: str, tail: tuple[int, ...] = ()) -> np.ndarray:
        """values broadcast to [B, *tail] (a scalar or [*tail] is the same for every row)."""
        v = np.asarray(values, np.float32)
        if v.shape in ((), tail, (self.batch, *tail), (1, *tail)):
            return np.array(np.broadcast_to(v, (self.batch, *tail)))
        raise InputError(f"{name} must be a scalar, {list(tail) or ''} or [batch={self.batch}"
                         f"{''.join(f', {n}' for n in tail)}], got shape {v.shape}")

    def add(self, vector, layers: Sequence[int], strengths=1.0, positions: Positions = "all") -> Interventions:
        """x += strengths[b] * vector at the residual `layers`, on `positions`. strengths: scalar or [B]."""
        s = self._per_row(strengths, "strengths")
        return self.replace(
            vectors=np.concatenate([np.asarray(self.vectors), self._rows(vector, layers)[None]]),
            strengths=np.concatenate([np.asarray(self.strengths), s[:, None]], axis=1),
            where=np.concatenate([np.asarray(self.where), np.asarray([position_weights(positions)], np.float32)]),
        )

    def ablate(self, direction, layers: Sequence[int], positions: Positions = "all", mean=0.0) -> Interventions:
        """Sets the stream's component along `direction` to `mean` at the residual `layers`: x -= (x . u - mean) u
        with u the unit direction; mean 0 projects it out, the direction's mean projection (a scalar, or one per
        listed layer) ablates it to its average.

        Several directions at one index are orthonormalised against the ones added before (Gram-Schmidt), so
        their span is removed.
        """
        rows = self._rows(direction, layers)
        means = np.zeros((self.n_layers + 1,), np.float32)
        mean = np.broadcast_to(np.asarray(mean, np.float32), (len(layers),))
        previous = np.asarray(self.ablate_dirs)
        for i, m in zip(layers, mean):
            r = rows[int(i)].astype(np.float64)
            for p in previous[:, int(i)]:
                r = r - (r @ p) * p
            norm = np.linalg.norm(r)
            if norm < 1e-6:
                raise InputError(f"ablation direction at index {i} is zero or in the span of earlier ones")
            rows[int(i)], means[int(i)] = (r / norm).astype(np.float32), m
        return self.replace(
            ablate_dirs=np.concatenate([previous, rows[None]]),
            ablate_means=np.concatenate([np.asarray(self.ablate_means), means[None]]),
            ablate_where=np.concatenate([np.asarray(self.ablate_where),
                                         np.asarray([position_weights(positions)], np.float32)]),
        )

    def patch_at(self, values, index: int, mask=None) -> Interventions:
        """Replaces the stream at residual `index` with `values` [B, T, D] where `mask` [B, T] is 1 (default:
        every column): what later layers read instead (e.g. an SAE reconstruction, for the spliced-in loss).
        Reads at `index` return the patched values."""
        if self.patch is not None:
            raise InputError("one patch per pass")
        self._check_index(index)
        values = jnp.asarray(values)
        if values.ndim != 3 or values.shape[0] not in (1, self.batch) or values.shape[2] != self.d_model:
            raise InputError(f"patch values must be [batch={self.batch}, seq, d_model={self.d_model}], got "
                             f"{values.shape}")
        mask = jnp.ones(values.shape[:2], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
        if mask.shape != values.shape[:2]:
            raise InputError(f"patch mask must be [batch, seq] = {values.shape[:2]}, got {mask.shape}")
        return self.replace(patch=Patch(values=values, mask=mask, index=int(index)))

    def clamp_sae(self, sae, *, index: int, latents: Sequence[int], values,
                  positions: Positions = "all") -> Interventions:
        """Clamps latents `latents` [M] of `sae` (an emojax.sae.Sae of any variant) to `values` ([M] or [B, M])
        at residual `index` (0..L-1)."""
        if self.sae is not None:
            raise InputError("one SAE clamp per pass")
        self._check_index(index, self.n_layers - 1)
        if sae.d_model != self.d_model:
            raise InputError(f"the SAE reads d_model {sae.d_model}; the model has {self.d_model}")
        F = sae.n_latents
        latents = np.asarray(latents, np.int32).reshape(-1)
        if latents.size and (latents.min() < 0 or latents.max() >= F):
            raise InputError(f"SAE latents must be in [0, {F}), got {latents.tolist()}")
        clamp = SaeClamp(params={k: np.asarray(v, np.float32) for k, v in sae.params.items()},
                         stats={k: np.asarray(v) for k, v in sae.stats.items()}, k=np.int32(sae.k),
                         input_scale=np.float32(sae.input_scale), latents=latents,
                         values=self._per_row(values, "SAE clamp values", (latents.size,)),
                         where=np.asarray(position_weights(positions), np.float32), variant=sae.variant,
                         index=int(index))
        return self.replace(sae=clamp)

    def apply(self, index, x_BTD: jax.Array, gen_BT: jax.Array) -> jax.Array:
        """Additive vectors and ablation at residual `index` (an int or a traced scalar).

        gen_BT: 1.0 on generated columns, 0.0 on prompt columns.
        """
        if self.vectors.shape[0]:
            coef_BTE = self.strengths.astype(jnp.float32)[:, None, :] * _on(self.where, gen_BT)
            delta = jnp.einsum("BTE,ED->BTD", coef_BTE, self.vectors[:, index].astype(jnp.float32))
            x_BTD = x_BTD + delta.astype(x_BTD.dtype)
        if self.ablate_dirs.shape[0]:
            u_AD = self.ablate_dirs[:, index].astype(jnp.float32)
            proj_BTA = jnp.einsum("BTD,AD->BTA", x_BTD.astype(jnp.float32), u_AD) - self.ablate_means[:, index]
            coef_BTA = proj_BTA * _on(self.ablate_where, gen_BT)
            x_BTD = (x_BTD.astype(jnp.float32) - jnp.einsum("BTA,AD->BTD", coef_BTA, u_AD)).astype(x_BTD.dtype)
        return x_BTD

    def apply_static(self, index: int, x_BTD: jax.Array, gen_BT: jax.Array) -> jax.Array:
        """The SAE clamp and the patch, where they act (a static index)."""
        if self.sae is not None and self.sae.index == index:
            x_BTD = self.sae.apply(x_BTD, gen_BT)
        if self.patch is not None and self.patch.index == index:
            x_BTD = self.patch.apply(x_BTD)
        return x_BTD

    def check(self, n_layers: int, d_model: int, batch: int) -> None:
        """Refuses interventions built for another model or batch, naming both."""
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise InputError(f"interventions are for {self.n_layers} layers x d_model {self.d_model}; the model "
                             f"has {n_layers} x {d_model}")
        if self.batch not in (1, batch):
            raise InputError(f"interventions were built for batch {self.batch}, the tokens are a batch of {batch}")

    def padded(self, pad: int) -> Interventions:
        """The same interventions for `pad` more rows (zeros: nothing added, nothing clamped, nothing patched)."""
        if pad == 0 or self.batch == 1:
            return self
        iv = self.replace(strengths=np.pad(np.asarray(self.strengths), ((0, pad), (0, 0))))
        if iv.sae is not None:
            iv = iv.replace(sae=iv.sae.replace(values=np.pad(np.asarray(iv.sae.values), ((0, pad), (0, 0)))))
        if iv.patch is not None and iv.patch.values.shape[0] > 1:
            iv = iv.replace(patch=iv.patch.replace(values=jnp.pad(iv.patch.values, ((0, pad), (0, 0), (0, 0))),
                                                   mask=jnp.pad(iv.patch.mask, ((0, pad), (0, 0)))))
        return iv

    def fingerprint(self) -> str:
        """sha256 of the structure and every value: what a store written under these interventions records."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(self)
        return arrays_digest({"structure": np.frombuffer(str(treedef).encode(), np.uint8),
                              **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}})

    def as_device(self) -> Interventions:
        return jax.tree.map(jnp.asarray, self)


__all__ = ["Interventions", "Patch", "Positions", "SaeClamp", "position_weights"]
