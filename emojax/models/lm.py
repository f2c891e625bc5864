"""`load_model` and `LanguageModel`: a loaded, sharded model with a jitted forward per capture set;
`tokenizer_for`, the tokenizer its text goes through, and `stop_tokens`, the ids its text ends at."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emojax.errors import CheckpointError, InputError
from emojax.fileio import atomic_path, write_text
from emojax.models.checkpoint import NUMPY_DTYPES, load_state, nest, param_shardings, save_safetensors
from emojax.models.config import ModelConfig
from emojax.models.hf_config import config_from_hf_dict, config_to_hf_dict, read_config_json
from emojax.models.presets import BUILTIN_NAMES, RANDOM_PREFIX, SHAPES, preset_names, resolve_builtin
from emojax.models.sharding import batch_multiple, logical_to_spec, single_device_mesh
from emojax.models.identity import model_identity
from emojax.models.interventions import Interventions
from emojax.models.layers import attention_kernel
from emojax.models.transformer import ForwardOutput, Transformer
from emojax.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


class LanguageModel:
    """A model ready to run: `lm(tokens, attention_mask=None, capture=(6, 9), interventions=None)`.

    Parameters live on `mesh` in their sharded layout. The forward is jitted once per (capture set, intervention
    structure, attention kernel, input shape); intervention values, tokens and masks are arguments and never
    cause a recompile. `attention` is the attention setting (emojax.models.layers.attention_kernel), resolved
    once here into the kernel every forward and decode of this model runs.
    """

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, mesh: Mesh,
                 tokenizer: Tokenizer | None = None, source: str = "", hf_config: dict | None = None,
                 attention: str = "xla"):
        self.config = config
        self.hf_config = hf_config  # the checkpoint's own config.json, written back unchanged by save()
        self.graphdef = graphdef
        self.params = params
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.source = source
        self.dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype)
        try:
            self._kernel = attention_kernel(attention, self.dtype, config.head_dim, config.attn_softcap)
        except ValueError as e:
            raise InputError(str(e)) from None
        self.trace_count = 0  # number of times a forward was traced (= compiled); tests read it
        self._param_shardings = jax.tree.map(lambda a: a.sharding, params)
        self._compiled: dict = {}

    @property
    def kernel(self) -> str:
        """The attention kernel every forward and decode of this model runs (fixed when it is loaded, so every
        compiled program of this model is keyed by it)."""
        return self._kernel

    @property
    def model(self) -> Transformer:
        """The Flax NNX module (shares the loaded arrays)."""
        return nnx.merge(self.graphdef, self.params)

    @functools.cached_property
    def identity(self) -> dict | None:
        """The content identity of the checkpoint this model was loaded from (emojax.models.identity), computed
        on first use; None for a model built in memory (random_model with a seed, a training run) that has no
        folder to identify it by."""
        source = str(self.source)
        if source.startswith(RANDOM_PREFIX) or (source and Path(source).is_dir()):
            return model_identity(source)
        return None

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))

    def __call__(self, tokens, attention_mask=None, capture: Sequence[int] = (),
                 interventions: Interventions | None = None, generated=None, logits: bool = True) -> ForwardOutput:
        """tokens int [B, T]; attention_mask [B, T] (1 = real token, 0 = left padding).

        Returns logits [B, T, V] (float32) and `hidden`, one [B, T, D] array per entry of `capture`, equal to
        transformers' output_hidden_states[i] for each index i. logits=False skips the unembedding and the
        layers after the deepest capture (logits is then None). `interventions` (emojax.models.interventions:
        add, ablate, patch, SAE clamp) act on the stream; `generated` [B, T] marks the columns where those with
        positions="generated" act (default: none).
        """
        capture = tuple(int(i) for i in capture)
        bad = [i for i in capture if not 0 <= i <= self.config.n_layers]
        if bad:
            raise InputError(f"capture indices {bad} are outside 0..{self.config.n_layers} "
                             "(0 = embeddings, i = output of layer i - 1)")
        if not logits and not capture:
            raise InputError("logits=False needs at least one capture index")
        return self._run((capture, logits), tokens, attention_mask, interventions, generated)

    def token_logprobs(self, tokens, attention_mask=None, interventions: Interventions | None = None,
                       generated=None, last: int | None = None) -> np.ndarray:
        """[B, T] float32: log P(token t | tokens before it) under the model (column 0 and padding: 0). Computed
        on the device, so the [B, T, V] logits never leave it: the scores of forced-choice options and of whole
        sequences. last: only the last `last` columns are scored (the others hold 0), and only their logits are
        computed: the options of a left-padded forced choice; one compiled program per value. Other arguments as
        for a forward."""
        T = np.shape(tokens)[-1]
        if last is not None and not 0 < last < T:
            raise InputError(f"last={last} must be in 1..{T - 1} for {T} columns")
        return np.asarray(self._run(("token_logprobs", last), tokens, attention_mask, interventions, generated))

    def _run(self, kind, tokens, attention_mask, interventions, generated):
        """The checks, batch padding and compiled call shared by the forward and token_logprobs."""
        tokens, mask = self.check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        if self.config.learned_positions and T > self.config.learned_positions:
            raise InputError(f"sequence length {T} exceeds the model's {self.config.learned_positions} "
                             "learned positions")
        gen = np.zeros((B, T), np.float32) if generated is None else np.asarray(generated, np.float32)
        if gen.shape != (B, T):
            raise InputError(f"generated must be [{B}, {T}] like the tokens, got {gen.shape}")
        if interventions is not None:
            interventions.check(self.config.n_layers, self.config.d_model, B)
            if interventions.patch is not None and interventions.patch.values.shape[1] != T:
                raise InputError(f"patch values cover {interventions.patch.values.shape[1]} positions, the tokens {T}")
        pad = -B % batch_multiple(self.mesh)  # shard the batch evenly; padded rows are dropped below
        if pad:
            tokens, mask, gen = (np.pad(a, ((0, pad), (0, 0))) for a in (tokens, mask, gen))
            interventions = None if interventions is None else interventions.padded(pad)
        iv = None if interventions is None else interventions.as_device()
        fn = self._forward_fn(kind, iv)
        with self._precision():
            out = fn(self.params, tokens, mask, gen, iv)
        if pad:
            out = jax.tree.map(lambda a: a[:B], out)
        return out

    def logit_lens(self, vectors_CD) -> np.ndarray:
        """[C, V] float64 logits of directions [C, D] read through the final norm and the unembedding (float32).
        A direction is not a residual stream: a LayerNorm's bias (GPT-2, NeoX), the same for every direction,
        is left out, so only the norm's scale shapes it."""
        model = self.model
        x = jnp.asarray(vectors_CD, jnp.float32)[None]
        return np.asarray(model.unembed(model.final_norm(x, bias=False))[0], np.float64)

    def check_tokens(self, tokens, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B, T] (T >= 1) and their mask (default all ones) as int32, refused with a clear error when the
        shapes disagree or an id is outside the vocabulary."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise InputError(f"tokens must be [batch, seq] with seq >= 1, got shape {tokens.shape}")
        mask = np.ones(tokens.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if mask.shape != tokens.shape:
            raise InputError(f"attention_mask shape {mask.shape} does not match tokens {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise InputError(f"token ids must be in [0, {self.config.vocab_size}); got {tokens.min()}..{tokens.max()}")
        return tokens, mask

    def _precision(self):
        # float32 models are compared against float32 references: no reduced-precision matmul passes.
        if self.dtype == jnp.float32:
            return jax.default_matmul_precision("highest")
        return contextlib.nullcontext()

    def _forward_fn(self, kind, iv: Interventions | None):
        """kind: (capture, logits) for a forward, ("token_logprobs", last) for those; one compiled program per kind
        and intervention structure."""
        key = (kind, jax.tree.structure(iv))
        if key not in self._compiled:
            self._compiled[key] = (self._build_logprobs(iv, kind[1]) if kind[0] == "token_logprobs"
                                   else self._build_forward(kind[0], iv, logits=kind[1]))
        return self._compiled[key]

    def _build_logprobs(self, iv: Interventions | None, last: int | None):
        mesh, graphdef, kernel = self.mesh, self.graphdef, self.kernel
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        replicated = NamedSharding(mesh, PartitionSpec())

        def logprobs(params, tokens, mask, gen, iv):
            self.trace_count += 1  # runs only while tracing
            model = nnx.merge(graphdef, params)
            n = tokens.shape[1] - 1 if last is None else last  # scored columns: the last n
            logits = model(tokens, mask, interventions=iv, generated_BT=gen, mesh=mesh, kernel=kernel,
                           logits=True if last is None else n + 1).logits
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp, tokens[:, -n:, None], axis=-1)[..., 0]
            picked = jnp.where(mask[:, -n:] > 0, picked, 0.0)
            return jnp.pad(picked, ((0, 0), (tokens.shape[1] - n, 0)))

        iv_shardings = jax.tree.map(lambda _: replicated, iv)
        return jax.jit(logprobs, in_shardings=(self._param_shardings, batch, batch, batch, iv_shardings),
                       out_shardings=batch)

    def _build_forward(self, capture: tuple[int, ...], iv: Interventions | None, logits: bool = True):
        mesh, graphdef, kernel = self.mesh, self.graphdef, self.kernel
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        replicated = NamedSharding(mesh, PartitionSpec())
        V, D = self.config.vocab_size, self.config.d_model

        def activation(axes, shape):
            return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

        # Only the logits' vocab dim and the batch matter for the output layout; sizes are illustrative.
        out_shardings = ForwardOutput(
            logits=activation(("batch", "seq", "act_vocab"), (batch_multiple(mesh), 1, V)) if logits else None,
            hidden=tuple(activation(("batch", "seq", "act_embed"), (batch_multiple(mesh), 1, D)) for _ in capture),
        )

        def forward(params, tokens, mask, gen, iv):
            self.trace_count += 1  # runs only while tracing
            model = nnx.merge(graphdef, params)
            return model(tokens, mask, capture=capture, interventions=iv, generated_BT=gen, mesh=mesh, logits=logits,
                         kernel=kernel)

        iv_shardings = jax.tree.map(lambda _: replicated, iv)  # intervention values are small: on every device
        return jax.jit(forward, in_shardings=(self._param_shardings, batch, batch, batch, iv_shardings),
                       out_shardings=out_shardings)

    def save(self, out_dir: str | Path) -> Path:
        """Writes a Hugging Face-format directory (config.json, model.safetensors, tokenizer.json)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf = dict(self.hf_config) if self.hf_config is not None else config_to_hf_dict(self.config)
        hf["dtype"] = str(self.dtype)
        save_safetensors(self.config, self.params, out_dir)
        write_text(out_dir / "config.json", json.dumps(hf, indent=2) + "\n")
        if self.tokenizer is not None and self.tokenizer.backend is not None:  # the byte tokenizer has no file
            with atomic_path(out_dir / "tokenizer.json") as tmp:
                self.tokenizer.backend.save(str(tmp))
        return out_dir


def tokenizer_for(lm: LanguageModel) -> Tokenizer:
    """The checkpoint's tokenizer.json, else the byte tokenizer when the vocabulary holds it (as `emojax dump`)."""
    if lm.tokenizer is not None:
        return lm.tokenizer
    if lm.config.vocab_size >= ByteTokenizer().vocab_size:
        return ByteTokenizer()
    raise InputError(f"{lm.source} has no tokenizer.json and its vocabulary ({lm.config.vocab_size}) is too small "
                     "for the byte tokenizer; use a checkpoint with a tokenizer")


def stop_tokens(lm: LanguageModel) -> list[int]:
    """The ids the model's text ends at: the tokenizer's eos_token (a chat model's end of turn), else config.json's
    eos_token_id (the first, when it lists several); none when the model names neither. Replies stop there and
    fine-tuning samples end there."""
    tokenizer = tokenizer_for(lm)
    token_id = tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None
    if token_id is None:
        token_id = (lm.hf_config or {}).get("eos_token_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
    return [int(token_id)] if isinstance(token_id, int) and 0 <= token_id < lm.config.vocab_size else []


def _resolve_dtype(dtype) -> np.dtype:
    name = jnp.dtype(dtype).name
    if name not in NUMPY_DTYPES:
        raise InputError(f"dtype must be one of {sorted(NUMPY_DTYPES)}, got {dtype!r}")
    return NUMPY_DTYPES[name]


def abstract_model(config: ModelConfig, dtype="float32") -> Transformer:
    """The model with ShapeDtypeStruct leaves: shapes and parameter counts without allocating."""
    return nnx.eval_shape(lambda: Transformer(config, dtype=_resolve_dtype(dtype), rngs=nnx.Rngs(0)))


def random_model(config: ModelConfig, dtype="float32", mesh: Mesh | None = None, seed: int = 0,
                 tokenizer: Tokenizer | None = None, attention: str = "xla") -> LanguageModel:
    """A randomly initialised model, created directly in its sharded layout."""
    np_dtype = _resolve_dtype(dtype)
    mesh = mesh or single_device_mesh()
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    shardings = nest(param_shardings(abstract_state, mesh))

    def init():
        return nnx.to_pure_dict(nnx.state(Transformer(config, dtype=np_dtype, rngs=nnx.Rngs(seed))))

    pure = jax.jit(init, out_shardings=shardings)()
    nnx.replace_by_pure_dict(abstract_state, pure)
    return LanguageModel(config, graphdef, abstract_state, mesh, tokenizer, source=f"random (seed {seed})",
                         attention=attention)


def load_model(path_or_preset: str | Path, dtype="float32", mesh: Mesh | None = None,
               attention: str = "xla") -> LanguageModel:
    """Loads a Hugging Face-format checkpoint directory, or a preset: "random:NAME" (random weights) or
    "builtin" / "builtin:tiny" (the small model emojax trains on its built-in corpus on first use, cached).

    Reads config.json, model.safetensors (or a sharded index) and tokenizer.json when present. With a mesh,
    every parameter is placed straight into its sharded layout. `attention`: the attention kernel setting
    (xla, cudnn, auto, xla-fused; emojax.models.layers.attention_kernel).
    """
    mesh = mesh or single_device_mesh()
    name = str(path_or_preset)
    if name in BUILTIN_NAMES and not Path(name).exists():
        path_or_preset = resolve_builtin(name)  # trained on first use (minutes), then reused
        name = str(path_or_preset)
    if name.startswith(RANDOM_PREFIX) and not Path(name).exists():
        shape = name[len(RANDOM_PREFIX):]
        if shape not in SHAPES:
            raise CheckpointError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
        lm = random_model(SHAPES[shape], dtype=dtype, mesh=mesh, attention=attention)
        lm.source = name  # the preset name is its identity (seed 0): see emojax.models.identity
        return lm
    path = Path(path_or_preset)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected config.json + *.safetensors) or a preset "
            f"({', '.join(preset_names())})"
        )
    hf_config = read_config_json(path)
    config = config_from_hf_dict(hf_config, source=str(path / "config.json"))
    np_dtype = _resolve_dtype(dtype)
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype))
    pure = load_state(config, path, abstract_state, mesh, np_dtype)
    nnx.replace_by_pure_dict(abstract_state, pure)
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    return LanguageModel(config, graphdef, abstract_state, mesh, tokenizer, source=str(path), hf_config=hf_config,
                         attention=attention)
