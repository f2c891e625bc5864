"""Where SAE arrays live on the ("data", "fsdp", "tensor") mesh: one table, used by the trainer and checkpoints.

The leading axis W of every train-state array is the sweep axis (several SAEs trained together): replicated.
Latents F are split over "tensor" (encoder columns, decoder rows), the token batch B over "data".
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emojax.models.sharding import make_mesh

# State leaf name -> partition of its dimensions (after the sweep axis).
STATE_SPECS: dict[str, tuple] = {
    "W_enc": (None, "tensor"),  # [D, F]
    "b_enc": ("tensor",),  # [F]
    "W_dec": ("tensor", None),  # [F, D]
    "b_dec": (None,),  # [D]
    "log_threshold": ("tensor",),  # [F]
    "since_fired": ("tensor",),  # [F]
}
BATCH_SPEC = P("data", None)  # x [B, D]


def sae_mesh(shape: tuple[int, int]) -> Mesh:
    """A mesh of data x tensor devices (fsdp = 1)."""
    return make_mesh((shape[0], 1, shape[1]))


def leaf_sharding(path, leaf, mesh: Mesh) -> NamedSharding:
    """Sharding of one train-state leaf: by the name of its last dict key; scalars and unknowns replicated."""
    name = next((p.key for p in reversed(path) if hasattr(p, "key")), None)
    spec = STATE_SPECS.get(name)
    if spec is None or leaf.ndim != len(spec) + 1:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(None, *spec))


def state_shardings(state, mesh: Mesh):
    """Shardings for every leaf of a train state (params, Adam moments, statistics)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: leaf_sharding(p, x, mesh), state)
