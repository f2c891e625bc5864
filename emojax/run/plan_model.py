"""The model half of `emojax plan`: which shape the run's model has, and what it needs per device in the dump.

Nothing here reads weights: the shape comes from config.json (or a preset) and every size from the abstract
model (jax.eval_shape) laid out by the same sharding table the dump uses, on an abstract mesh (no devices).

Per-device activation memory of one dump batch (an estimate; `dump_activation_bytes` computes it):

    rows   = the largest bucket's batch rows (rows_per_bucket) / (data x fsdp);  tok = rows x T (T: that bucket)
    captured  = tok x n_captured x d_model x bytes(dump.dtype)  +  rows x n_captured x d_model x 4 (pooled sums)
    residual  = 2 x tok x d_model x bytes(dump.model_dtype)                      (a layer's input and output)
    attention = tok x (N + 2K) x H / t x bytes(model_dtype)  +  rows x N / t x T x T x 4  (q, k, v; float32 scores)
    mlp       = tok x (2 if gated else 1) x d_mlp / t x bytes(model_dtype)
    total     = captured + residual + attention + mlp

with t the tensor axis where it divides the heads (resp. kv heads, d_mlp), else 1 (that dimension is then
replicated). One layer's working set is counted, as XLA frees it before the next layer. The scores term is the
full [rows, N, T, T] matrix: an upper bound, as the blocked attention holds only a block of it at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np

from emojax.errors import ConfigError
from emojax.models.config import ModelConfig
from emojax.models.presets import BUILTIN_NAMES, RANDOM_PREFIX, SHAPES

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    config: ModelConfig
    shape_from: str  # where the shape came from, in words
    tokenizer: str | None  # "byte", a folder with tokenizer.json, or None: the run's tokenizer is not here
    notes: tuple[str, ...] = ()


def preset_from_file_name(config_file: str | Path | None) -> str | None:
    """The longest preset name the config file's name starts with (llama-3.1-8b-gpu.yaml -> llama-3.1-8b)."""
    if not config_file:
        return None
    stem = Path(config_file).stem.lower()
    matches = [name for name in SHAPES if stem == name or stem.startswith(name + "-")]
    return max(matches, key=len) if matches else None


def resolve_model(run_file, config_file=None, model_shape: str | None = None,
                  train_config=None) -> ResolvedModel:
    """The shape of `run.model` without loading it. `train_config`: the train stage's TrainConfig (built-in
    models); `model_shape`: a preset name that replaces the model's own shape (for a folder not on this host)."""
    model = run_file.run.model
    folder = Path(model)
    here = not model.startswith(RANDOM_PREFIX) and model not in BUILTIN_NAMES and folder.is_dir()
    if model_shape is not None:
        if model_shape not in SHAPES:
            raise ConfigError(f"--model-shape {model_shape!r} is not a preset; presets: {', '.join(SHAPES)}")
        notes = (f"shape from --model-shape {model_shape}" + (f"; {model}/config.json is not read" if here else ""),)
        return ResolvedModel(SHAPES[model_shape], f"preset {model_shape} (--model-shape)",
                             _folder_tokenizer(folder) if here else None, notes)
    if model in BUILTIN_NAMES:
        return _builtin(model, train_config)
    if model.startswith(RANDOM_PREFIX):
        name = model[len(RANDOM_PREFIX):]
        if name not in SHAPES:
            raise ConfigError(f"{run_file.source}: run.model={model!r} is not a preset; presets: "
                              f"{', '.join(RANDOM_PREFIX + n for n in SHAPES)}")
        return ResolvedModel(SHAPES[name], f"preset {name} (random weights)", "byte")
    if here:
        from emojax.models.hf_config import read_hf_config

        return ResolvedModel(read_hf_config(folder), f"{folder / 'config.json'}", _folder_tokenizer(folder))
    preset = preset_from_file_name(config_file)
    if preset is None:
        raise ConfigError(f"{run_file.source}: run.model={model!r} is not a folder on this machine, so its shape is "
                          f"unknown here; pass --model-shape NAME (one of {', '.join(SHAPES)})")
    note = f"model folder {model} not found here; shape from preset {preset} (the config file's name)"
    return ResolvedModel(SHAPES[preset], f"preset {preset} (from the config file's name)", None, (note,))


def _folder_tokenizer(folder: Path) -> str:
    return str(folder) if (folder / "tokenizer.json").is_file() else "byte"


def _builtin(model: str, train_config) -> ResolvedModel:
    from emojax.train.builtin import builtin_folder, default_cache_dir, is_complete

    name = BUILTIN_NAMES[model]
    folder = builtin_folder(default_cache_dir(), name, train_config)
    if is_complete(folder, train_config.fingerprint()):
        return ResolvedModel(train_config.model_config(), f"built-in {name} (trained, cached at {folder})",
                             str(folder))
    note = f"built-in {name} model not trained yet: the train stage trains it first (plan does not)"
    return ResolvedModel(train_config.model_config(), f"built-in {name} (train section)", None, (note,))


@functools.cache
def parameter_layout(config: ModelConfig, mesh_shape: tuple[int, int, int]) -> dict:
    """Parameter counts of the abstract model, and elements per device under the sharding table on `mesh_shape`
    (data, fsdp, tensor). Returns total, per_device, per_layer (of one decoder layer) and head (the unembedding)."""
    from flax import nnx
    from jax.sharding import AbstractMesh

    from emojax.models.checkpoint import logical_axes_of
    from emojax.models.lm import abstract_model
    from emojax.models.sharding import MESH_AXES, logical_to_spec

    mesh = AbstractMesh(tuple(mesh_shape), MESH_AXES)
    _, state = nnx.split(abstract_model(config, "float32"))
    total = per_device = in_layers = 0
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        spec = logical_to_spec(logical_axes_of(var, len(x.shape)), x.shape, mesh)
        size = int(np.prod(x.shape))
        split = math.prod(math.prod(mesh.shape[a] for a in ((p,) if isinstance(p, str) else p))
                          for p in spec if p is not None)
        total += size
        per_device += size // split
        if str(path[0]) == "layers":
            in_layers += size
    return {"total": total, "per_device": per_device, "per_layer": in_layers // config.n_layers,
            "head": config.vocab_size * config.d_model}


def forward_flops_per_token(config: ModelConfig, depth: int = 0, head: bool = True) -> float:
    """~2 x the weights a token meets: `depth` layers (0: all) and the unembedding when `head` (attention's own
    FLOPs are left out; the embedding is a lookup)."""
    layout = parameter_layout(config, (1, 1, 1))
    return 2.0 * (layout["per_layer"] * (depth or config.n_layers) + (layout["head"] if head else 0))


def dump_activation_bytes(config: ModelConfig, mesh_shape, rows: int, T: int, n_captured: int, store_dtype: str,
                          model_dtype: str) -> dict:
    """The module docstring's formula, per device, for one batch of `rows` x `T` tokens (rows over the mesh)."""
    data, fsdp, tensor = mesh_shape
    rows_dev = -(-rows // (data * fsdp))
    tok = rows_dev * T
    b = DTYPE_BYTES[model_dtype]
    t_of = lambda n: tensor if n % tensor == 0 else 1  # noqa: E731  (replicated where the axis does not divide)
    d, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    parts = {
        "captured": tok * n_captured * d * DTYPE_BYTES[store_dtype] + rows_dev * n_captured * d * 4,
        "residual": 2 * tok * d * b,
        "attention": tok * (N // t_of(N) + 2 * (K // t_of(K))) * H * b + rows_dev * (N // t_of(N)) * T * T * 4,
        "mlp": tok * (2 if config.mlp_gated else 1) * (config.d_mlp // t_of(config.d_mlp)) * b,
    }
    return {"rows_per_device": rows_dev, "tokens_per_device": tok, **parts, "total": sum(parts.values())}


__all__ = ["DTYPE_BYTES", "ResolvedModel", "dump_activation_bytes", "forward_flops_per_token", "parameter_layout",
           "preset_from_file_name", "resolve_model"]
