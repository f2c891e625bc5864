"""Sharding is data: one table from logical axes to mesh axes.

Mesh axes are ("data", "fsdp", "tensor"). Parameters carry logical axis names as variable metadata
(`logical_axes`); activations are constrained at block boundaries with the same vocabulary. A dimension whose
size the mesh axes do not divide is replicated instead (odd test sizes, few kv heads on a wide tensor axis):
correctness never depends on the layout, only speed does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes). Parameter axes first, then activation axes.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "capture": None,
}


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over the first prod(shape) devices (all devices by default)."""
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {tuple(shape)}")
    devices = list(devices if devices is not None else jax.devices())
    n = math.prod(shape)
    if n > len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {n} devices; {len(devices)} available")
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh((1, 1, 1), jax.devices()[:1])


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions are named by `logical_axes`.

    A mesh axis is used at most once per array, and only where it divides the dimension.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        target = LOGICAL_AXIS_RULES[name] if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def named_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Sharding constraint on an activation inside jit; a no-op without a mesh or on one device."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(logical_axes, x.shape, mesh))


def batch_multiple(mesh: Mesh) -> int:
    """Batch sizes must be a multiple of this to shard over ("data", "fsdp")."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
