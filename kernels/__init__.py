"""Pallas kernels, importable as `emojax.kernels` (an install maps this folder there).

Each kernel lives beside a pure-JAX `reference_*` of the same function; tests/test_kernels.py compares the two
(values and gradients) in interpret mode on CPU.

    kernel          reference                  computes
    sparse_decode   reference_sparse_decode    TopK SAE decoder: out_BD[b] = sum_k vals_BJ[b, k] * W_FD[idx_BJ[b, k]],
                                               with Pallas kernels for d vals (gather-dot) and d W (scatter-add)

The rule: emojax uses a kernel only where scripts/bench_kernels.py shows it faster than its reference on that
backend. On CPU never: there the kernels run in Pallas interpret mode, which exists for correctness tests only.

Why this file imports nothing: from the repository root this folder is also the top-level module `kernels`, the
name of Hugging Face's kernel-hub package, and transformers imports whatever answers to that name while it probes
for it (to read its version). Any environment started from the repository root, including one without jax, goes
through here on every transformers model import, so the package must load with the standard library alone. The
kernels are attributes resolved on first use (PEP 562); the import inside is relative so that the folder works
under either name. transformers then finds no `__version__` and ignores the package.
"""

from __future__ import annotations

import importlib

# attribute -> submodule that defines it
_LAZY = {"sparse_decode": ".sparse_decode", "reference_sparse_decode": ".sparse_decode"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    # Importing the submodule bound its name (`sparse_decode`) on this package to the module; the public names
    # must be the functions, so bind every attribute it provides now, which also skips __getattr__ next time.
    for attr, source in _LAZY.items():
        if source == _LAZY[name]:
            globals()[attr] = getattr(module, attr)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
