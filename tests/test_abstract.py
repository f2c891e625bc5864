"""Full-size shapes are built abstractly (no allocation) and have the published parameter counts."""

import jax
import numpy as np
import pytest

import emojax
from emojax.models.presets import SHAPES

# Published sizes (Hugging Face model cards / safetensors metadata).
PUBLISHED = {"llama-3.1-8b": 8_030_261_248, "tinyllama-1.1b": 1_100_048_384, "gemma-2-2b": 2_614_341_888,
             "pythia-1.4b": 1_414_647_808, "gpt2": 124_439_808}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_parameter_count(name):
    model = emojax.abstract_model(SHAPES[name], dtype="bfloat16")
    leaves = jax.tree.leaves(model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    count = sum(int(np.prod(x.shape)) for x in leaves)
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 1e-3, count
