"""Pallas kernels, importable as `emojax.kernels` (an install maps this folder there).

Each kernel lives beside a pure-JAX `reference_*` of the same function; tests/test_kernels.py compares the two
(values and gradients) in interpret mode on CPU.

    kernel          reference                  computes
    sparse_decode   reference_sparse_decode    TopK SAE decoder: out_BD[b] = sum_k vals_BK[b, k] * W_FD[idx_BK[b, k]],
                                               with Pallas kernels for d vals (gather-dot) and d W (scatter-add)

The rule: emojax uses a kernel only where scripts/bench_kernels.py shows it faster than its reference on that
backend. On CPU never: there the kernels run in Pallas interpret mode, which exists for correctness tests only.

The import is relative on purpose: from the repository root this folder is also the top-level module `kernels`,
the name of Hugging Face's kernel-hub package, and transformers imports whatever answers to that name while it
probes for it. Imported that way this package must load too (transformers then finds no version and ignores it).
"""

from .sparse_decode import reference_sparse_decode, sparse_decode

__all__ = ["reference_sparse_decode", "sparse_decode"]
