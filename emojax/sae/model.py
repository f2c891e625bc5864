"""A trained SAE ready for inference on raw (unscaled) activations."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from emojax.sae.variants import Variant, decode


@dataclass(frozen=True)
class Sae:
    """One SAE: params W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D] (+ extras) act on inputs scaled by
    `input_scale` (x * input_scale has unit mean squared norm in training); outputs are in raw units."""

    variant: Variant
    params: dict  # numpy arrays
    stats: dict = field(default_factory=dict)
    input_scale: float = 1.0
    k: int = 0

    @property
    def d_model(self) -> int:
        return int(self.params["W_dec"].shape[1])

    @property
    def n_latents(self) -> int:
        return int(self.params["W_dec"].shape[0])

    def _hyper(self):
        return {"k": jnp.asarray(self.k, jnp.int32), "coeff": jnp.zeros((), jnp.float32)}

    def encode(self, x_BD) -> jax.Array:
        """Latent activations [B, F] of raw inputs [B, D]."""
        x = jnp.asarray(x_BD, jnp.float32) * self.input_scale
        return _encode(self.variant, self.params, self.stats, x, self._hyper())

    def decode(self, acts_BF) -> jax.Array:
        """Reconstruction [B, D] in raw units."""
        return _decode(self.params, jnp.asarray(acts_BF, jnp.float32)) / self.input_scale

    def reconstruct(self, x_BD) -> jax.Array:
        return self.decode(self.encode(x_BD))

    def decoder_rows(self) -> np.ndarray:
        return np.asarray(self.params["W_dec"])


@jax.jit
def _decode(params, acts):
    return decode(params, acts)


def _encode(variant, params, stats, x, hyper):
    return _encode_jit(variant, params, stats, x, hyper)


_encode_jit = jax.jit(lambda variant, params, stats, x, hyper: variant.encode(params, stats, x, hyper),
                      static_argnums=0)
