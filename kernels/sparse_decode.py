"""The TopK SAE sparse decoder as Pallas kernels: out_BD[b] = sum_k vals_BJ[b, k] * W_FD[idx_BJ[b, k]].

Axes: B tokens, J latents chosen per token, F latents (decoder rows), D model width; X = B*J (token, latent)
pairs, `chunk` per d W step; lowercase letters are tiles. All arrays are float32 except idx_BJ (int32).

Three kernels, all tiled over D so each program touches a contiguous slice of every decoder row it reads:

* forward, grid (B tiles, D tiles): a loop over the J chosen latents gathers W_FD[idx_BJ[:, k]] for the tile's
  tokens (one row gather per k, no (B, J, D) intermediate) and accumulates vals * rows.
* d vals, grid (B tiles, D tiles): the same gather, dotted with the incoming gradient g_BD; each D tile writes
  its own partial (B, J) slice and the partials are summed outside, so no program waits on another.
* d W, grid (F tiles, D tiles): a scatter-add written as a gather, so that it needs no atomics. Outside the
  kernel the X pairs are sorted by latent (one lax.sort) and the first pair of each F tile is found with
  searchsorted. A program then owns its (F tile, D tile) of dW outright: it walks only the pairs that hit its
  rows, `chunk` at a time, gathers their g rows scaled by vals (chunk, D tile), and adds them to its rows
  through a one-hot (F tile, chunk) matmul (at HIGHEST precision: the default TF32 would cost ~1e-3 relative
  error). Why this and not the alternatives: atomics (Triton's atomic_add, B-gridded) make dW's summation
  order, hence its rounding, change from run to run; a one-hot over all F without sorting costs X*F*D work;
  gridding over B and reducing partial dW copies costs a dense (B tiles, F, D) buffer. The sorted form costs
  X*D reads of g plus the F*D write every dense dW pays, is deterministic, and a latent chosen by many tokens
  only lengthens its own tile's loop.

Shapes need not divide the block sizes: B is padded with zero-valued pairs; the D tile is the largest power of
two in [16, block_d] dividing D, and only where none does are W and g padded to a multiple of the tile (a full
copy of W: it never happens for model widths, which are multiples of 16); F is padded for dW only. Block sizes
are powers of two and matmul operands at least 16 wide, as the Triton lowering on GPU requires.

`interpret` defaults to True on CPU, where compiled Pallas does not exist: interpret mode is for correctness
tests, never for speed. On GPU, Triton CompilerParams pin the Triton backend: without them jax 0.10 picks Mosaic
GPU, whose pallas_call lowering refuses this kind of kernel (e.g. the d W matmul). Not yet run on a GPU:
tests/test_kernels.py only checks that forward and backward lower to Triton IR for CUDA (the Triton compiler
itself, and speed, are first met by scripts/bench_kernels.py --device gpu, which also reports the kernels' error
against the reference).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

_MIN_BLOCK = 16  # smallest tile side that Triton's tl.dot accepts


def reference_sparse_decode(vals_BJ: jax.Array, idx_BJ: jax.Array, W_FD: jax.Array) -> jax.Array:
    """Pure-JAX sparse decode, differentiable by autodiff: out_BD[b] = sum_k vals_BJ[b, k] * W_FD[idx_BJ[b, k]].

    vals_BJ float32 (B, J), idx_BJ int32 (B, J) in [0, F), W_FD float32 (F, D) -> float32 (B, D). Materialises the
    gathered rows (B, J, D); autodiff gives the gather-dot for d vals and a scatter-add for d W.
    """
    return jnp.einsum("BJ,BJD->BD", vals_BJ, W_FD[idx_BJ], precision=lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling of one call: block sizes and padded extents."""

    B: int
    J: int
    F: int
    D: int
    block_b: int
    block_d: int
    block_f: int
    chunk: int
    interpret: bool
    num_warps: int

    @property
    def B_pad(self) -> int:
        return _round_up(self.B, self.block_b)

    @property
    def D_pad(self) -> int:
        return _round_up(self.D, self.block_d)

    @property
    def F_pad(self) -> int:
        return _round_up(self.F, self.block_f)

    def call(self, kernel, grid, in_specs, out_specs, out_shape):
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
            interpret=self.interpret,
            compiler_params=pl_triton.CompilerParams(num_warps=self.num_warps))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _d_block(D: int, block_d: int) -> int:
    """Largest power of two in [16, block_d] dividing D; failing that, the tile D is padded to."""
    size = block_d
    while size >= _MIN_BLOCK:
        if D % size == 0:
            return size
        size //= 2
    return min(block_d, max(_MIN_BLOCK, _next_pow2(D)))


def _check(vals_BJ, idx_BJ, W_FD, block_b, block_d, block_f, chunk) -> None:
    shapes = f"vals_BJ {vals_BJ.shape} {vals_BJ.dtype}, idx_BJ {idx_BJ.shape} {idx_BJ.dtype}, " \
             f"W_FD {W_FD.shape} {W_FD.dtype}"
    if vals_BJ.ndim != 2 or W_FD.ndim != 2 or idx_BJ.shape != vals_BJ.shape:
        raise ValueError(f"sparse_decode wants vals_BJ (B, J), idx_BJ (B, J), W_FD (F, D); got {shapes}")
    if 0 in vals_BJ.shape or 0 in W_FD.shape:
        raise ValueError(f"sparse_decode wants non-empty arrays; got {shapes}")
    if vals_BJ.dtype != jnp.float32 or W_FD.dtype != jnp.float32 or idx_BJ.dtype != jnp.int32:
        raise ValueError(f"sparse_decode wants float32 vals_BJ and W_FD and int32 idx_BJ; got {shapes}")
    for name, size, least in (("block_b", block_b, 1), ("block_d", block_d, _MIN_BLOCK),
                              ("block_f", block_f, _MIN_BLOCK), ("chunk", chunk, _MIN_BLOCK)):
        if size < least or size & (size - 1):
            raise ValueError(f"sparse_decode: {name} must be a power of two >= {least}, got {size}")


def sparse_decode(vals_BJ: jax.Array, idx_BJ: jax.Array, W_FD: jax.Array, *, interpret: bool | None = None,
                  block_b: int = 32, block_d: int = 128, block_f: int = 16, chunk: int = 32,
                  num_warps: int = 4) -> jax.Array:
    """Sparse decode by Pallas kernels, forward and backward: out_BD[b] = sum_k vals_BJ[b, k] * W_FD[idx_BJ[b, k]].

    vals_BJ float32 (B, J), idx_BJ int32 (B, J), W_FD float32 (F, D) -> float32 (B, D). Differentiable in vals_BJ
    and W_FD (idx_BJ gets no gradient). Indices outside [0, F) are clamped (not checked: that would need a host
    sync), so they read a wrong row rather than foreign memory.

    interpret: run the kernels in Pallas interpret mode; None means "only on CPU". block_b / block_d: tile of
    tokens / width in the forward and d vals kernels (block_d also in d W); block_f: decoder rows per d W program;
    chunk: pairs per step of the d W loop; num_warps: Triton warps per program. All powers of two.
    """
    _check(vals_BJ, idx_BJ, W_FD, block_b, block_d, block_f, chunk)
    (B, J), (F, D) = vals_BJ.shape, W_FD.shape
    plan = _Plan(B=B, J=J, F=F, D=D, block_b=min(block_b, _next_pow2(B)),
                 block_d=_d_block(D, block_d), block_f=block_f, chunk=chunk,
                 interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret),
                 num_warps=num_warps)
    return _sparse_decode(vals_BJ, jnp.clip(idx_BJ, 0, F - 1), W_FD, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sparse_decode(vals_BJ, idx_BJ, W_FD, plan: _Plan):
    return _forward(vals_BJ, idx_BJ, _pad_cols(W_FD, plan.D_pad), plan)[:, :plan.D]


def _sparse_decode_fwd(vals_BJ, idx_BJ, W_FD, plan: _Plan):
    out_BD = _forward(vals_BJ, idx_BJ, _pad_cols(W_FD, plan.D_pad), plan)[:, :plan.D]
    return out_BD, (vals_BJ, idx_BJ, W_FD)


def _sparse_decode_bwd(plan: _Plan, residuals, g_BD):
    vals_BJ, idx_BJ, W_FD = residuals
    g_BD = _pad_cols(g_BD.astype(jnp.float32), plan.D_pad)
    d_vals_BJ = _d_vals(idx_BJ, _pad_cols(W_FD, plan.D_pad), g_BD, plan)
    d_W_FD = _d_W(vals_BJ, idx_BJ, g_BD, plan)[:plan.F, :plan.D]
    return d_vals_BJ, None, d_W_FD


_sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def _pad_cols(x, width):
    return x if x.shape[1] == width else jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def _pad_rows(x_BJ, rows):
    return x_BJ if x_BJ.shape[0] == rows else jnp.pad(x_BJ, ((0, rows - x_BJ.shape[0]), (0, 0)))


def _forward(vals_BJ, idx_BJ, W_FD, plan: _Plan):
    """(B, D_pad): padded tokens are zero-valued pairs on row 0, so they add nothing."""
    bb, bd, J = plan.block_b, plan.block_d, plan.J

    def kernel(vals_ref, idx_ref, w_ref, out_ref):
        def add_latent(k, acc_bd):
            rows_bd = w_ref[idx_ref[:, k], :]  # gather: row idx[b, k], this program's D tile, for each token b
            return acc_bd + vals_ref[:, k][:, None] * rows_bd
        out_ref[...] = lax.fori_loop(0, J, add_latent, jnp.zeros(out_ref.shape, jnp.float32))

    out = plan.call(
        kernel, grid=(plan.B_pad // bb, plan.D_pad // bd),
        in_specs=[pl.BlockSpec((bb, J), lambda i, j: (i, 0)), pl.BlockSpec((bb, J), lambda i, j: (i, 0)),
                  pl.BlockSpec((plan.F, bd), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bb, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((plan.B_pad, plan.D_pad), jnp.float32),
    )(_pad_rows(vals_BJ, plan.B_pad), _pad_rows(idx_BJ, plan.B_pad), W_FD)
    return out[:plan.B]


def _d_vals(idx_BJ, W_FD, g_BD, plan: _Plan):
    """d vals_BJ[b, k] = <g_BD[b], W_FD[idx_BJ[b, k]]>, summed over per-D-tile partials."""
    bb, bd, J = plan.block_b, plan.block_d, plan.J
    n_d = plan.D_pad // bd

    def kernel(idx_ref, w_ref, g_ref, partial_ref):
        g_bd = g_ref[...]

        def dot_latent(k, carry):
            partial_ref[:, k] = jnp.sum(w_ref[idx_ref[:, k], :] * g_bd, axis=1)
            return carry
        lax.fori_loop(0, J, dot_latent, 0)

    partial_BnJ = plan.call(
        kernel, grid=(plan.B_pad // bb, n_d),
        in_specs=[pl.BlockSpec((bb, J), lambda i, j: (i, 0)), pl.BlockSpec((plan.F, bd), lambda i, j: (0, j)),
                  pl.BlockSpec((bb, bd), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((bb, J), lambda i, j: (i, j)),  # D tile j writes columns [j*J, (j+1)*J)
        out_shape=jax.ShapeDtypeStruct((plan.B_pad, n_d * J), jnp.float32),
    )(_pad_rows(idx_BJ, plan.B_pad), W_FD, _pad_rows(g_BD, plan.B_pad))
    return partial_BnJ[:plan.B].reshape(plan.B, n_d, J).sum(axis=1)


def _d_W(vals_BJ, idx_BJ, g_BD, plan: _Plan):
    """(F_pad, D_pad): row f is the sum of vals_BJ[b, k] * g_BD[b] over the pairs with idx_BJ[b, k] == f."""
    bf, bd, bx = plan.block_f, plan.block_d, plan.chunk
    n_f = plan.F_pad // bf
    X = plan.B * plan.J
    # Pairs sorted by latent, then a chunk of sentinel pairs (latent F_pad: no tile's row, value 0) so that a chunk
    # starting at any real pair stays in bounds without masks.
    f_X, b_X, v_X = lax.sort((idx_BJ.reshape(X), jnp.arange(X, dtype=jnp.int32) // plan.J, vals_BJ.reshape(X)),
                             num_keys=1)
    f_X = jnp.concatenate([f_X, jnp.full((bx,), plan.F_pad, jnp.int32)])
    b_X = jnp.concatenate([b_X, jnp.zeros((bx,), jnp.int32)])
    v_X = jnp.concatenate([v_X, jnp.zeros((bx,), jnp.float32)])
    tile_start = jnp.searchsorted(f_X[:X], jnp.arange(n_f + 1, dtype=jnp.int32) * bf).astype(jnp.int32)

    def kernel(start_ref, f_ref, b_ref, v_ref, g_ref, out_ref):
        t = pl.program_id(0)
        start, end = start_ref[t], start_ref[t + 1]
        row_fx = t * bf + lax.broadcasted_iota(jnp.int32, (bf, bx), 0)

        def add_chunk(c, acc_fd):
            pairs = pl.ds(start + c * bx, bx)
            scaled_xd = v_ref[pairs][:, None] * g_ref[b_ref[pairs], :]
            # Pairs past `end` belong to later tiles (or are sentinels) and match none of this tile's rows.
            hits_fx = (f_ref[pairs][None, :] == row_fx).astype(jnp.float32)
            return acc_fd + jnp.dot(hits_fx, scaled_xd, precision=lax.Precision.HIGHEST)
        out_ref[...] = lax.fori_loop(0, (end - start + bx - 1) // bx, add_chunk, jnp.zeros(out_ref.shape, jnp.float32))

    whole_X = pl.BlockSpec(f_X.shape, lambda t, j: (0,))
    return plan.call(
        kernel, grid=(n_f, plan.D_pad // bd),
        in_specs=[pl.BlockSpec(tile_start.shape, lambda t, j: (0,)), whole_X, whole_X, whole_X,
                  pl.BlockSpec((plan.B, bd), lambda t, j: (0, j))],
        out_specs=pl.BlockSpec((bf, bd), lambda t, j: (t, j)),
        out_shape=jax.ShapeDtypeStruct((plan.F_pad, plan.D_pad), jnp.float32),
    )(tile_start, f_X, b_X, v_X, g_BD)
