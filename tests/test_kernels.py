"""Pallas kernels against their pure-JAX references, in interpret mode on CPU: values and gradients.

Shapes are small and mostly odd so tiling bugs show: B, F and D that divide no block size, D that forces the
padded path, block sizes small enough that every grid has several tiles, and indices repeated both across
tokens and within one token (both make the d W scatter-add collide). A last test lowers the kernels for CUDA
(Triton) without a GPU, which catches what the Triton lowering refuses (non-power-of-two tiles, ops).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emojax.kernels import reference_sparse_decode, sparse_decode

SMALL_BLOCKS = dict(block_b=8, block_d=16, block_f=16, chunk=16)  # several tiles even at test sizes


def _inputs(B, K, F, D, seed=0, idx_BJ=None):
    rng = np.random.default_rng(seed)
    vals_BJ = jnp.asarray(rng.normal(size=(B, K)), jnp.float32)
    if idx_BJ is None:
        idx_BJ = rng.integers(0, F, size=(B, K))
    W_FD = jnp.asarray(rng.normal(size=(F, D)) / np.sqrt(D), jnp.float32)
    probe_BD = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)  # turns out_BD into a scalar loss
    return vals_BJ, jnp.asarray(idx_BJ, jnp.int32), W_FD, probe_BD


def _value_and_grads(decode, vals_BJ, idx_BJ, W_FD, probe_BD):
    def loss(vals_BJ, W_FD):
        out_BD = decode(vals_BJ, idx_BJ, W_FD)
        return jnp.sum(out_BD * probe_BD), out_BD
    (_, out_BD), (d_vals_BJ, d_W_FD) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(vals_BJ, W_FD)
    return {"out": out_BD, "d_vals": d_vals_BJ, "d_W": d_W_FD}


def _assert_matches_reference(inputs, **blocks):
    got = _value_and_grads(lambda v, i, w: sparse_decode(v, i, w, **blocks), *inputs)
    want = _value_and_grads(reference_sparse_decode, *inputs)
    for name in want:
        scale = float(jnp.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("B, K, F, D", [
    (16, 4, 64, 32),    # everything divides the blocks
    (37, 5, 101, 40),   # nothing divides; D has no power-of-two divisor >= 16, so W and g are padded
    (61, 8, 256, 96),   # D tile 32 divides 96: no padding of W
    (3, 1, 17, 16),     # K = 1, fewer tokens than a block
])
def test_matches_reference(B, K, F, D):
    _assert_matches_reference(_inputs(B, K, F, D), **SMALL_BLOCKS)


def test_matches_reference_default_blocks():
    _assert_matches_reference(_inputs(64, 8, 200, 128, seed=1))


def test_repeated_indices():
    B, K, F, D = 48, 6, 80, 48
    rng = np.random.default_rng(2)
    idx_BJ = rng.integers(0, F, size=(B, K))
    idx_BJ[:, 0] = 7                 # one latent chosen by every token: 48 pairs on one row, several chunks
    idx_BJ[:, 1] = idx_BJ[:, 2]      # the same row twice within each token
    idx_BJ[::3, 3:] = 79             # the last row (last, partly padded F tile) chosen often
    _assert_matches_reference(_inputs(B, K, F, D, seed=2, idx_BJ=idx_BJ), **SMALL_BLOCKS)


def test_jit_matches_eager():
    vals_BJ, idx_BJ, W_FD, _ = _inputs(20, 4, 50, 32, seed=3)
    eager = sparse_decode(vals_BJ, idx_BJ, W_FD, **SMALL_BLOCKS)
    jitted = jax.jit(lambda v, i, w: sparse_decode(v, i, w, **SMALL_BLOCKS))(vals_BJ, idx_BJ, W_FD)
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_allclose(eager, reference_sparse_decode(vals_BJ, idx_BJ, W_FD), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vals, idx, W, match", [
    ((8, 4), (8, 3), (16, 32), "idx_BJ \\(8, 3\\)"),
    ((8, 4), (8, 4), (2, 16, 32), "W_FD \\(2, 16, 32\\)"),
    ((0, 4), (0, 4), (16, 32), "non-empty"),
])
def test_refuses_bad_shapes(vals, idx, W, match):
    with pytest.raises(ValueError, match=match):
        sparse_decode(jnp.zeros(vals, jnp.float32), jnp.zeros(idx, jnp.int32), jnp.zeros(W, jnp.float32))


@pytest.mark.parametrize("vals_dtype, idx_dtype, W_dtype", [
    (jnp.bfloat16, jnp.int32, jnp.float32),
    (jnp.float32, jnp.int16, jnp.float32),
    (jnp.float32, jnp.int32, jnp.float16),
    (jnp.float32, jnp.float32, jnp.float32),
])
def test_refuses_bad_dtypes(vals_dtype, idx_dtype, W_dtype):
    with pytest.raises(ValueError, match="float32 vals_BJ and W_FD and int32 idx_BJ"):
        sparse_decode(jnp.zeros((8, 4), vals_dtype), jnp.zeros((8, 4), idx_dtype), jnp.zeros((16, 32), W_dtype))


def test_refuses_bad_block_sizes():
    args = (jnp.zeros((8, 4), jnp.float32), jnp.zeros((8, 4), jnp.int32), jnp.zeros((16, 32), jnp.float32))
    with pytest.raises(ValueError, match="block_d must be a power of two >= 16, got 24"):
        sparse_decode(*args, block_d=24)
    with pytest.raises(ValueError, match="chunk must be a power of two >= 16, got 8"):
        sparse_decode(*args, chunk=8)


def _lowers_for_cuda_here() -> bool:
    """jaxlib <= 0.10.2 lowers Pallas to Triton IR without a GPU; later ones also compile it, which needs CUDA."""
    import jaxlib
    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:3] if p.isdigit())
    return version <= (0, 10, 2) or jax.default_backend() == "gpu"


@pytest.mark.skipif(not _lowers_for_cuda_here(), reason="this jaxlib compiles Triton at lowering; needs a GPU")
@pytest.mark.parametrize("B, K, F, D", [(4096, 32, 32768, 2048), (1000, 20, 5000, 768), (37, 5, 101, 40)])
def test_lowers_to_triton(B, K, F, D):
    """Forward and backward lower for CUDA with interpret=False: three Triton kernels, nothing else refused."""
    def loss(vals_BJ, idx_BJ, W_FD, probe_BD):
        return jnp.sum(sparse_decode(vals_BJ, idx_BJ, W_FD, interpret=False) * probe_BD)
    shapes = [jax.ShapeDtypeStruct(s, t) for s, t in
              (((B, K), jnp.float32), ((B, K), jnp.int32), ((F, D), jnp.float32), ((B, D), jnp.float32))]
    lowered = jax.jit(jax.grad(loss, (0, 2))).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3


def test_the_repository_folder_imports_as_the_top_level_kernels_module_too():
    """From the repository root, kernels/ is also the top-level module `kernels`: the name of Hugging Face's
    kernel-hub package, which transformers imports while probing for it. It must load there, without emojax's
    install mapping (as in a bare copy of the repository), and transformers must not take it for that package."""
    repo = Path(__file__).resolve().parent.parent
    probe = ("import sys; sys.modules['emojax.kernels'] = None; "  # as if emojax were not installed
             "import kernels; assert kernels.sparse_decode.__module__ == 'kernels.sparse_decode'; "
             "from transformers.utils.import_utils import is_kernels_available; assert not is_kernels_available(); "
             "import transformers; transformers.LlamaConfig")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]


# Run with cwd = the repository root: a finder ahead of all others makes jax and jaxlib look uninstalled (and
# records any attempt), as in an environment that has transformers but not jax.
_WITHOUT_JAX = """
import importlib.abc, sys
attempts = []
class NoJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib"):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoJax())
"""


def test_the_top_level_kernels_module_imports_without_jax():
    """`import kernels` from the repository root loads nothing heavy, so transformers' probe for Hugging Face's
    `kernels` package (which imports whatever answers to that name) cannot break a model import where jax is
    absent; the kernels themselves load on first attribute access."""
    repo = Path(__file__).resolve().parent.parent
    probe = _WITHOUT_JAX + (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"  # failed here when kernels/ imported jax
        "LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,\n"
        "                             num_attention_heads=2, num_key_value_heads=2))\n"
        "import kernels\n"
        "assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__\n"
        "assert not attempts and 'jax' not in sys.modules, attempts\n"
        "assert sorted(kernels.__all__) == ['reference_sparse_decode', 'sparse_decode'], kernels.__all__\n"
        "assert getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
        "try:\n"
        "    kernels.sparse_decode\n"
        "except ModuleNotFoundError as e:\n"
        "    assert e.name.startswith('jax'), e\n"
        "else:\n"
        "    raise AssertionError('the kernels loaded without jax')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(repo)], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
