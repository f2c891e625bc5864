"""The training loop: AdamW over the model's parameters, a jitted step with buffer donation, orbax checkpoints.

One trainer for training from scratch (random parameters, every target counted) and for fine-tuning (the loaded
model's parameters, a loss mask counting response targets only, steering interventions in every training forward).
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
from emojax.models.interventions import Interventions
from emojax.models.transformer import Transformer
from emojax.progress import fmt, progress_bar
from emojax.train.config import Optimization
from emojax.train.data import TokenData
from emojax.train.evaluate import token_nll


@struct.dataclass
class TrainState:
    params: dict  # nnx pure dict of the Transformer's parameters
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: steps taken


def learning_rate(opt: Optimization) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps, decay_steps=opt.steps,
        end_value=opt.lr * opt.min_lr_ratio,
    )


def _decays(params: dict) -> dict:
    """Weight decay on projection matrices only: not on embeddings or norm scales."""
    def decay(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return names[0] != "embed" and not any("norm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(b2: float, weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
    """AdamW at learning rate 1: the train step scales the update by the step's learning rate, an argument,
    so the schedule (lr, warmup, steps) never changes the compiled program."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(1.0, b1=0.9, b2=b2, weight_decay=weight_decay, mask=_decays),
    )


def batch_loss(graphdef: nnx.GraphDef, params, rows_BT1: jax.Array, mask_BT1: jax.Array | None = None,
               interventions: Interventions | None = None) -> jax.Array:
    """Mean next-token NLL (nats) over the counted targets of rows [B, T+1]: every target (mask None), or token j
    where mask[:, j] is 1 (j >= 1; a fine-tune's response tokens). `interventions` act in the forward."""
    nll_BT = token_nll(graphdef, params, rows_BT1, interventions)
    if mask_BT1 is None:
        return jnp.mean(nll_BT)
    weight_BT = mask_BT1[:, 1:].astype(jnp.float32)
    return jnp.sum(nll_BT * weight_BT) / jnp.maximum(jnp.sum(weight_BT), 1.0)


@functools.lru_cache(maxsize=8)
def compiled_functions(model_config: ModelConfig, b2: float, weight_decay: float, grad_clip: float):
    """(graphdef, init(seed), start(params), step(state, rows, lr, mask, interventions)), jitted once per model
    and optimizer setting (a resumed or repeated run in the same process does not compile again; the step
    compiles once more for a loss mask or an intervention structure, never for their values)."""
    optimizer = make_optimizer(b2, weight_decay, grad_clip)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))

    def start(params):
        return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    def init(seed):
        return start(nnx.to_pure_dict(nnx.state(Transformer(model_config, rngs=nnx.Rngs(jax.random.key(seed))))))

    def step(state: TrainState, rows, lr, mask=None, interventions=None):
        """rows int32 [B, T+1]; lr float32 scalar; mask [B, T+1] or None (see batch_loss). Returns the new state
        and the step's metrics."""
        loss, grads = jax.value_and_grad(lambda p: batch_loss(graphdef, p, rows, mask, interventions))(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return graphdef, jax.jit(init), jax.jit(start), jax.jit(step, donate_argnums=0)


class DivergedError(EmojaxError):
    """The loss became NaN or inf: the settings (learning rate, warmup) make training diverge."""


class Trainer:
    """Trains a model of `model_config` on `data` with `opt`; checkpoints under `checkpoint_dir` (None: none),
    marked with `fingerprint` (a checkpoint of another fingerprint is refused).

    initial_params: the nnx pure dict to start from (a fine-tune; None: random, from opt.seed); its buffers may be
    donated to the first step, so evaluate it before `run`. interventions: applied in every training forward
    (steering during training), batch 1 (every row alike); never part of the parameters.
    """

    def __init__(self, opt: Optimization, model_config: ModelConfig, data: TokenData,
                 checkpoint_dir: str | Path | None = None, fingerprint: str = "", initial_params: dict | None = None,
                 interventions: Interventions | None = None):
        self.opt = opt
        self.data = data
        self.fingerprint = fingerprint
        self.model_config = model_config
        self.initial_params = initial_params
        self.interventions = None if interventions is None else interventions.as_device()
        self.graphdef, self._init, self._start, self._step = compiled_functions(
            model_config, opt.b2, opt.weight_decay, opt.grad_clip)
        self.manager = None
        if checkpoint_dir is not None:
            self.manager = ocp.CheckpointManager(
                Path(checkpoint_dir).absolute(),
                options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
            )
        self.history: list[dict] = []  # per step: loss, grad_norm, lr
        self.resumed_from = 0

    def init_state(self) -> TrainState:
        if self.initial_params is not None:
            return self._start(self.initial_params)
        return self._init(jnp.asarray(self.opt.seed, jnp.uint32))

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
        if meta["rows_consumed"] != step * self.opt.batch_size:
            raise CheckpointError(f"{where}: the checkpoint at step {step} has an inconsistent data position; "
                                  "remove the folder to start afresh")
        self.history = list(meta.get("history", []))
        self.resumed_from = step
        return restored["state"]

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        meta = {"fingerprint": self.fingerprint, "step": step, "rows_consumed": step * self.opt.batch_size,
                "history": self.history}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def run(self, until: int | None = None, progress: bool = True) -> tuple[TrainState, dict]:
        """Trains from the latest checkpoint up to step `until` (default: opt.steps).

        Returns the final state and timing figures (tokens/s measured after the first, compiling, step).
        """
        opt = self.opt
        end = opt.steps if until is None else min(until, opt.steps)
        state = self.restore_or_init()
        start = int(state.step)
        lrs = np.asarray(learning_rate(opt)(np.arange(opt.steps)), np.float32)  # host-side, per step
        tokens_per_step = opt.batch_size * (self.data.train.shape[1] - 1)
        pending: tuple[int, dict] | None = None
        label = "train-lm" if opt.section == "train" else f"train-lm --{opt.section}"
        t_start = time.perf_counter()
        t_first = None  # time when the first (compiling) step finished

        def record(step: int, metrics: dict) -> None:
            nonlocal t_first
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            values["lr"] = float(lrs[step])
            if not np.isfinite(values["loss"]):
                raise DivergedError(f"{label}: the loss is {values['loss']} at step {step + 1} (learning rate "
                                    f"{values['lr']:.3g}): training diverged; lower {opt.section}.lr or "
                                    "lengthen its warmup (nothing of this run was exported)")
            self.history.append(values)
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                tps = "-"
            else:
                tps = fmt(round((step - start) * tokens_per_step / (now - t_first)))
            update(completed=step + 1, status=f"step {fmt(step + 1)}/{fmt(opt.steps)}  loss {fmt(values['loss'])}  "
                                              f"{tps} tok/s")

        with progress_bar(label, opt.steps, enabled=progress, completed=start) as update:
            for step in range(start, end):
                rows, mask = self.data.batch(step, opt.batch_size, opt.seed)
                state, metrics = self._step(state, rows, lrs[step], mask, self.interventions)
                if pending is not None:
                    record(*pending)  # the previous step's metrics: ready while this step runs
                pending = (step, metrics)
                if self.manager is not None and ((step + 1) % opt.checkpoint_every == 0 or step + 1 == end):
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
