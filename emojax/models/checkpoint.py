"""Strict safetensors reading and writing of Hugging Face-format checkpoints.

Loading is abstract-first: the model's shapes come from `nnx.eval_shape`, the key table is checked against the
files (every missing, unexpected or misshapen tensor is reported by name) before any weight is read, and each
parameter is then assembled shard by shard with `jax.make_array_from_callback`, so every device receives only
its own slice and no device ever holds a full copy.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from emojax.errors import CheckpointError
from emojax.fileio import atomic_path
from emojax.models.config import ModelConfig
from emojax.models.hf_keys import TensorMap, key_table, redundant_keys
from emojax.models.sharding import named_sharding

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from the sharded index when there is one)."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        files = sorted({_weight_file_in(checkpoint_dir, index, key, name) for key, name in weight_map.items()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists weight files that do not exist: {missing}")
        return files
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in checkpoint_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{checkpoint_dir}: only pickled weights ({', '.join(pickled)}); emojax reads safetensors only, "
            "because unpickling can run arbitrary code. Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
        )
    raise CheckpointError(f"{checkpoint_dir}: no *.safetensors weight files")


def _weight_file_in(checkpoint_dir: Path, index: Path, key: str, name) -> Path:
    """The file an index entry names, refused unless it lies inside the checkpoint folder: an index comes from a
    download like the weights, and one naming /etc/... or ../../ would make emojax read (and, through the
    identity hash, fingerprint) arbitrary files."""
    entry = f"{key!r} -> {name!r}"
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: entry {entry} must name a file inside {checkpoint_dir}")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{index}: entry {entry} names a file outside its folder (absolute paths and '..' "
                              f"are refused); the index may only name files inside {checkpoint_dir}")
    path, folder = checkpoint_dir / name, checkpoint_dir.resolve()
    # A Hugging Face hub cache is the one layout whose files are symlinks out of their folder, into the blob store
    # of the same repository: models--org--name/snapshots/<revision>/x -> ../../blobs/<hash>.
    allowed = [folder] + ([folder.parent.parent / "blobs"] if folder.parent.name == "snapshots" else [])
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in allowed):
        raise CheckpointError(f"{index}: entry {entry} resolves to {target}, outside {checkpoint_dir} (a symlink "
                              "out of the folder); the index may only name files inside it: copy the weights there")
    return path


class SafetensorsReader:
    """Lazy, read-only view over the tensors of several safetensors files."""

    def __init__(self, files: list[Path]):
        self._stack = contextlib.ExitStack()
        self._where: dict[str, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="numpy"))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                self._stack.close()
                raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from None
            for key in handle.keys():
                self._where[key] = handle
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get_tensor(key)


def check_keys(cfg: ModelConfig, reader: SafetensorsReader, source: Path) -> list[TensorMap]:
    """Validates names and shapes of every tensor before anything is loaded; returns the key table."""
    present = set(reader.shapes)
    table = key_table(cfg, present)
    expected = {key: m.hf_shape for m in table for key in m.hf_keys(cfg.n_layers)}
    found = set(reader.shapes)
    missing = sorted(expected.keys() - found)
    unexpected = sorted(found - expected.keys() - redundant_keys(cfg, present))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_abbreviate(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_abbreviate(unexpected)}")
    wrong = [f"{k} has shape {reader.shapes[k]}, expected {shape}" for k, shape in sorted(expected.items())
             if k in found and reader.shapes[k] != shape]
    if wrong:
        more = f" (+{len(wrong) - 8} more)" if len(wrong) > 8 else ""
        problems.append("wrong shapes: " + "; ".join(wrong[:8]) + more)
    if problems:
        raise CheckpointError(
            f"{source}: checkpoint does not match its config.json ({cfg.architecture}, {cfg.n_layers} layers, "
            f"d_model {cfg.d_model}): " + " | ".join(problems)
        )
    return table


def _abbreviate(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def logical_axes_of(var: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
    """A parameter's logical axes; stacked layer parameters gain a leading 'layers' axis."""
    axes = tuple(var.get_metadata().get("logical_axes", (None,) * ndim))
    if len(axes) == ndim - 1:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        raise AssertionError(f"logical axes {axes} do not match a {ndim}-d parameter")
    return axes


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict[tuple[str, ...], jax.sharding.NamedSharding]:
    """NamedSharding of every parameter, by state path."""
    out = {}
    for path, var in nnx.to_flat_state(abstract_state):
        shape = var.get_value().shape
        out[tuple(str(p) for p in path)] = named_sharding(logical_axes_of(var, len(shape)), shape, mesh)
    return out


def load_state(cfg: ModelConfig, checkpoint_dir: Path, abstract_state: nnx.State, mesh: Mesh,
               dtype: np.dtype) -> dict:
    """Reads every parameter straight into its sharded layout; returns a nested pure dict of arrays."""
    shardings = param_shardings(abstract_state, mesh)
    shapes = {tuple(str(p) for p in path): var.get_value().shape for path, var in nnx.to_flat_state(abstract_state)}
    with SafetensorsReader(weight_files(checkpoint_dir)) as reader:
        table = check_keys(cfg, reader, Path(checkpoint_dir))
        if {m.path for m in table} != set(shapes):
            raise AssertionError(f"key table and model disagree: {sorted({m.path for m in table} ^ set(shapes))}")
        arrays = {m.path: _assemble(m, reader, shapes[m.path], shardings[m.path], dtype, cfg.n_layers)
                  for m in table}
    return nest(arrays)


def _assemble(m: TensorMap, reader: SafetensorsReader, shape, sharding, dtype, n_layers: int) -> jax.Array:
    cache: dict[int, np.ndarray] = {}

    def layer_tensor(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = m.to_emojax(reader.get(m.hf_key.format(i=i))).astype(dtype)
        return cache[i]

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if not m.stacked:
            return layer_tensor(0)[index]
        layers = range(*index[0].indices(n_layers))
        return np.stack([layer_tensor(i)[index[1:]] for i in layers])

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def nest(flat: dict[tuple[str, ...], object]) -> dict:
    """{("a", "b"): x} -> {"a": {"b": x}} (the pure-dict form of an nnx.State)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def iter_hf_tensors(cfg: ModelConfig, state: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face key, tensor) pairs of a model state, in the Hugging Face layout."""
    flat = {tuple(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}
    for m in key_table(cfg):
        value = np.asarray(jax.device_get(flat[m.path]))
        if m.stacked:
            for i in range(cfg.n_layers):
                yield m.hf_key.format(i=i), m.to_hf(value[i])
        else:
            yield m.hf_key, m.to_hf(value)


def save_safetensors(cfg: ModelConfig, state: nnx.State, out_dir: Path) -> Path:
    """Writes model.safetensors in the Hugging Face layout (loadable by transformers and by emojax)."""
    tensors = {key: np.ascontiguousarray(t) for key, t in iter_hf_tensors(cfg, state)}
    path = Path(out_dir) / "model.safetensors"
    # Never a half-written weight file under the real name; a full disk is a DiskFullError (fileio reads it from
    # safetensors' error text).
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return path


NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
