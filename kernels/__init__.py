"""Pallas kernels, importable as `emojax.kernels`.

Each kernel lives beside a pure-JAX `reference_*` of the same function; tests/test_kernels.py compares the two
(values and gradients) in interpret mode on CPU.

    kernel          reference                  computes
    sparse_decode   reference_sparse_decode    TopK SAE decoder: out_BD[b] = sum_k vals_BK[b, k] * W_FD[idx_BK[b, k]],
                                               with Pallas kernels for d vals (gather-dot) and d W (scatter-add)

The rule: emojax uses a kernel only where scripts/bench_kernels.py shows it faster than its reference on that
backend. On CPU never: there the kernels run in Pallas interpret mode, which exists for correctness tests only.
"""

from emojax.kernels.sparse_decode import reference_sparse_decode, sparse_decode

__all__ = ["reference_sparse_decode", "sparse_decode"]
