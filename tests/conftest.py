"""Test setup, before JAX picks its backend: 8 simulated CPU devices for the sharding tests, and a low XLA
backend optimisation level, since the suite's tiny models are dominated by compile time (about 5x faster
compiles; the parity tolerances hold either way).

The suite runs on CPU. EMOJAX_TEST_PLATFORMS (JAX's platform list, e.g. "cuda,cpu") makes the default backend an
accelerator instead: scripts/gpu_check.sh runs its selection of device-sensitive tests that way, on one GPU."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers (hf_checkpoints)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", os.environ.get("EMOJAX_TEST_PLATFORMS") or "cpu")
