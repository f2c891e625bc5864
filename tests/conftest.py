"""Test setup: 8 simulated CPU devices for the sharding tests (must run before JAX picks its backend)."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
