"""Test setup, before JAX picks its backend: 8 simulated CPU devices for the sharding tests, and a low XLA
backend optimisation level, since the suite's tiny models are dominated by compile time (about 5x faster
compiles; the parity tolerances hold either way).

The suite runs on CPU. EMOJAX_TEST_PLATFORMS (JAX's platform list, e.g. "cuda,cpu") makes the default backend an
accelerator instead: scripts/gpu_check.sh runs its selection of device-sensitive tests that way, on one GPU.

Every test fails if it resolves the default built-in model (it trains for minutes where it is not cached).

A test that needs a system program asks the `require_system` fixture for it: `make test` installs those programs
(.ci/system-deps), and under CI=true a missing one fails the test rather than skipping it, so CI cannot pass
green while running none of them."""

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers (hf_checkpoints)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", os.environ.get("EMOJAX_TEST_PLATFORMS") or "cpu")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture
def require_system():
    """require_system(*programs, package=...) -> the path of the first of `programs` on PATH. When none is there,
    the test skips, or fails under CI=true; the message names the Debian package to install."""

    def require(*programs: str, package: str) -> str:
        for program in programs:
            found = shutil.which(program)
            if found:
                return found
        message = (f"none of {', '.join(programs)} on PATH: install the system package {package!r} "
                   f"(Debian: apt-get install {package}; `make test` does so as root)")
        if _in_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)

    return require


@pytest.fixture(autouse=True)
def _never_the_default_builtin_model(monkeypatch):
    """Fails a test that resolves the default built-in model: this machine may have it cached, but a fresh one (CI)
    would train it for about ten minutes inside the test. Tests use builtin:tiny or a checkpoint of their own."""
    from emojax.train import builtin

    train_lm = builtin.train_lm

    def guarded(config, out, *args, **kwargs):
        if Path(out).name.startswith("builtin-default-"):
            pytest.fail(f"the test resolved the default built-in model ({out}), which a fresh machine trains for "
                        "minutes: give it builtin:tiny or a checkpoint", pytrace=False)
        return train_lm(config, out, *args, **kwargs)

    monkeypatch.setattr(builtin, "train_lm", guarded)


@pytest.fixture(autouse=True)
def _no_api_key_from_the_environment(monkeypatch):
    """The serve tests set EMOJAX_API_KEY where they test it; one in the caller's environment must not leak in."""
    monkeypatch.delenv("EMOJAX_API_KEY", raising=False)
