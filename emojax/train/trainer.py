"""The training loop: AdamW over the model's parameters, a jitted step with buffer donation, orbax checkpoints.

The train state (parameters, optimizer state, step) is a pytree of arrays; the model graph is split off once
and merged inside the step. A checkpoint holds the state plus the data position, and the batch of a step is a
pure function of (seed, step), so a run resumed from a checkpoint computes bitwise the same parameters as
one that was never interrupted. Metrics are read back one step late, so the host never stalls the device.
A loss that turns NaN or inf stops the run with an error (before that state is checkpointed or exported).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from emojax.errors import CheckpointError, EmojaxError
from emojax.models.config import ModelConfig
from emojax.models.transformer import Transformer
from emojax.progress import fmt, progress_bar
from emojax.train.config import TrainConfig
from emojax.train.data import TokenData
from emojax.train.evaluate import token_nll


@struct.dataclass
class TrainState:
    params: dict  # nnx pure dict of the Transformer's parameters
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: steps taken


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps, decay_steps=config.steps,
        end_value=config.lr * config.min_lr_ratio,
    )


def _decays(params: dict) -> dict:
    """Weight decay on projection matrices only: not on embeddings or norm scales."""
    def decay(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return names[0] != "embed" and not any("norm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW at learning rate 1: the train step scales the update by the step's learning rate, an argument,
    so the schedule (lr, warmup, steps) never changes the compiled program."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(1.0, b1=0.9, b2=config.b2, weight_decay=config.weight_decay, mask=_decays),
    )


@functools.lru_cache(maxsize=8)
def compiled_functions(model_config: ModelConfig, b2: float, weight_decay: float, grad_clip: float):
    """(graphdef, optimizer, init(seed), step(state, rows, lr)), jitted once per model and optimizer setting
    (a resumed or repeated run in the same process does not compile again)."""
    config = TrainConfig(b2=b2, weight_decay=weight_decay, grad_clip=grad_clip)
    optimizer = make_optimizer(config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))

    def init(seed):
        params = nnx.to_pure_dict(nnx.state(Transformer(model_config, rngs=nnx.Rngs(jax.random.key(seed)))))
        return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    def loss_fn(params, rows):
        return jnp.mean(token_nll(graphdef, params, rows))

    def step(state: TrainState, rows, lr):
        """rows int32 [B, T+1]; lr float32 scalar. Returns the new state and the step's metrics."""
        loss, grads = jax.value_and_grad(loss_fn)(state.params, rows)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return graphdef, optimizer, jax.jit(init), jax.jit(step, donate_argnums=0)


class DivergedError(EmojaxError):
    """The loss became NaN or inf: the settings (learning rate, warmup) make training diverge."""


class Trainer:
    """Trains `config`'s model on `data`; checkpoints under `checkpoint_dir` (None: no checkpoints)."""

    def __init__(self, config: TrainConfig, data: TokenData, checkpoint_dir: str | Path | None = None,
                 fingerprint: str = ""):
        self.config = config
        self.data = data
        self.fingerprint = fingerprint or config.fingerprint()
        self.model_config = config.model_config()
        self.graphdef, self.optimizer, self._init, self._step = compiled_functions(
            self.model_config, config.b2, config.weight_decay, config.grad_clip)
        self.manager = None
        if checkpoint_dir is not None:
            self.manager = ocp.CheckpointManager(
                Path(checkpoint_dir).absolute(),
                options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
            )
        self.history: list[dict] = []  # per step: loss, grad_norm, lr
        self.resumed_from = 0

    def init_state(self) -> TrainState:
        return self._init(jnp.asarray(self.config.seed, jnp.uint32))

    def restore_or_init(self) -> TrainState:
        """The latest checkpoint of this configuration, or a fresh state."""
        state = self.init_state()
        if self.manager is None or self.manager.latest_step() is None:
            return state
        step = self.manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        where = self.manager.directory
        if meta.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{where}: the checkpoint at step {step} belongs to another configuration; "
                                  "remove the folder to start this one afresh")
        if meta["rows_consumed"] != step * self.config.batch_size:
            raise CheckpointError(f"{where}: the checkpoint at step {step} has an inconsistent data position; "
                                  "remove the folder to start afresh")
        self.history = list(meta.get("history", []))
        self.resumed_from = step
        return restored["state"]

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        meta = {"fingerprint": self.fingerprint, "step": step, "rows_consumed": step * self.config.batch_size,
                "history": self.history}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def run(self, until: int | None = None, progress: bool = True) -> tuple[TrainState, dict]:
        """Trains from the latest checkpoint up to step `until` (default: config.steps).

        Returns the final state and timing figures (tokens/s measured after the first, compiling, step).
        """
        config = self.config
        end = config.steps if until is None else min(until, config.steps)
        state = self.restore_or_init()
        start = int(state.step)
        lrs = np.asarray(learning_rate(config)(np.arange(config.steps)), np.float32)  # host-side, per step
        tokens_per_step = config.batch_size * config.seq_len
        pending: tuple[int, dict] | None = None
        t_start = time.perf_counter()
        t_first = None  # time when the first (compiling) step finished

        def record(step: int, metrics: dict) -> None:
            nonlocal t_first
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            values["lr"] = float(lrs[step])
            if not np.isfinite(values["loss"]):
                raise DivergedError(f"train-lm: the loss is {values['loss']} at step {step + 1} (learning rate "
                                    f"{values['lr']:.3g}): training diverged; lower train.lr or raise "
                                    "train.warmup_steps (nothing of this run was exported)")
            self.history.append(values)
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                tps = "-"
            else:
                tps = fmt(round((step - start) * tokens_per_step / (now - t_first)))
            update(completed=step + 1, status=f"step {fmt(step + 1)}/{fmt(config.steps)}  loss {fmt(values['loss'])}  "
                                              f"{tps} tok/s")

        with progress_bar("train-lm", config.steps, enabled=progress, completed=start) as update:
            for step in range(start, end):
                rows = self.data.batch(step, config.batch_size, config.seed)
                state, metrics = self._step(state, rows, lrs[step])
                if pending is not None:
                    record(*pending)  # the previous step's metrics: ready while this step runs
                pending = (step, metrics)
                if self.manager is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == end):
                    record(*pending)
                    pending = None
                    self.save(state)
            if pending is not None:
                record(*pending)
        t_end = time.perf_counter()
        timing = {"steps_run": end - start, "seconds": t_end - t_start,
                  "tokens_per_second": ((end - start - 1) * tokens_per_step / (t_end - t_first))
                  if t_first is not None and end - start > 1 and t_end > t_first else None}
        return state, timing

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def count_params(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
