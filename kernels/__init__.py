"""Pallas kernels, importable as `emojax.kernels`.

Each kernel lives beside a pure-JAX `reference_*` of the same function; tests compare the two (values and
gradients) in interpret mode on CPU.
"""
