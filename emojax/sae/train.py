"""Training sparse autoencoders: one jitted, donated step for a whole sweep of SAEs on a data x tensor mesh.

    result = train_sae(SaeConfig(variant="topk", n_latents=4096, k=32, store="runs/x/acts", layer=6, out=...))
    sae = result.sae(0)                       # inference on raw activations: sae.reconstruct(x_BD)

The step is pure: dead-latent statistics (tokens since each latent fired) and every metric are outputs, read
on the host one step late so the device never waits. A batch holding NaN/inf leaves the state unchanged (an
on-device branch); the host sees the flag a step later and stops with the store rows of the bad tokens. Parameters
that turn NaN/inf anyway (a diverging run) are flagged per SAE the same way, and the host stops before any
checkpoint or export holds them. One writer at a time: training holds a WriterLock on config.out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emojax.errors import CheckpointError, EmojaxError
from emojax.locks import WriterLock
from emojax.progress import fmt, log
from emojax.sae.checkpoint import SaeCheckpoints, abstract_like
from emojax.sae.config import SaeConfig
from emojax.sae.data import BatchSource, StoreSource, sample_rows, source_identity
from emojax.sae.fingerprint import differences, fingerprint
from emojax.sae.model import Sae
from emojax.sae.sharding import BATCH_SPEC, sae_mesh, state_shardings
from emojax.sae.variants import Variant, make_variant

class NonFiniteBatchError(EmojaxError):
    """An input batch held NaN or inf; training stopped before the state was touched by it."""

    def __init__(self, step: int, rows: np.ndarray):
        self.step, self.rows = step, rows
        shown = ", ".join(str(int(r)) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
        super().__init__(f"SAE step {step}: the input batch holds NaN/inf at {len(rows)} token(s), store rows "
                         f"[{shown}]; fix or re-dump those documents (the state before this batch is intact)")


class NonFiniteParamsError(EmojaxError):
    """The parameters of some SAE(s) of the sweep turned NaN/inf: training diverged. Nothing from that step on
    was checkpointed or exported."""

    def __init__(self, step: int, saes: list[int], config: SaeConfig):
        self.step, self.saes = step, saes
        names = ", ".join(f"{i} ({config.sweep}={config.values(config.sweep)[i]})" if config.sweep else str(i)
                          for i in saes)
        where = f"; the checkpoints in {config.out}/checkpoints before it are intact" if config.out else ""
        super().__init__(f"SAE step {step}: the parameters of SAE {names} of the sweep became NaN/inf (training "
                         f"diverged; nothing from this step on was checkpointed or exported{where}); lower sae.lr "
                         "or raise sae.lr_warmup_steps and train again in another sae.out")


def lr_schedule(config: SaeConfig) -> optax.Schedule:
    """Linear warmup, constant, then a linear decay to zero over the last lr_decay_frac of the steps."""
    warm = max(min(config.lr_warmup_steps, config.steps), 1)
    decay_start = max(int(config.steps * (1 - config.lr_decay_frac)), warm)
    return optax.join_schedules([
        optax.linear_schedule(0.0 if config.lr_warmup_steps else config.lr, config.lr, warm),
        optax.constant_schedule(config.lr),
        optax.linear_schedule(config.lr, 0.0, max(config.steps - decay_start, 1)),
    ], [warm, decay_start])


def geometric_median(x_XD: np.ndarray, iters: int = 30) -> np.ndarray:
    """Weiszfeld's iteration, from the mean."""
    m = x_XD.mean(0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x_XD - m, axis=1), 1e-8)
        m = (w[:, None] * x_XD).sum(0) / w.sum()
    return m


def input_statistics(sample_XD: np.ndarray) -> tuple[float, np.ndarray]:
    """(scale making the mean squared norm 1, geometric median of the scaled sample [D])."""
    x = sample_XD.astype(np.float64)
    scale = float(1.0 / np.sqrt(np.mean(np.sum(x ** 2, axis=1))))
    return scale, geometric_median(x * scale).astype(np.float32)


@dataclass
class SaeTrainer:
    """The compiled pieces of one run: state init, the step, shardings. Same code on 1 device and a mesh."""

    config: SaeConfig
    d_model: int
    mesh: jax.sharding.Mesh = None
    variant: Variant = field(init=False)

    def __post_init__(self):
        self.mesh = self.mesh or sae_mesh(self.config.mesh)
        self.variant = make_variant(self.config, groups=self.mesh.shape["tensor"],
                                    platform=self.mesh.devices.flat[0].platform)
        self.optimizer = optax.adam(lr_schedule(self.config), b1=self.config.adam_b1, b2=self.config.adam_b2)
        abstract = jax.eval_shape(self._init, jax.ShapeDtypeStruct((self.d_model,), jnp.float32))
        self.shardings = state_shardings(abstract, self.mesh)
        self.abstract_state = abstract_like(abstract, self.shardings)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, BATCH_SPEC)
        self.init = jax.jit(self._init, out_shardings=self.shardings)
        self.step = jax.jit(self._step, in_shardings=(self.shardings, self.batch_sharding, replicated, replicated),
                            out_shardings=(self.shardings, replicated), donate_argnums=0)
        c = self.config
        self.hyper = {"k": jnp.asarray(c.values("k"), jnp.int32),
                      "coeff": jnp.asarray(c.values("sparsity_coeff"), jnp.float32)}

    # ---- state

    def _init_one(self, key, b_dec_D):
        F, D = self.config.n_latents, self.d_model
        W_dec = jax.random.normal(key, (F, D), jnp.float32)
        W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
        params = {"W_enc": W_dec.T, "b_enc": jnp.zeros((F,), jnp.float32), "W_dec": W_dec, "b_dec": b_dec_D,
                  **self.variant.init_extra(F)}
        stats = {"since_fired": jnp.zeros((F,), jnp.int32), **self.variant.init_stats(F)}
        return {"params": params, "opt": self.optimizer.init(params), "stats": stats}

    def _init(self, b_dec_D):
        keys = jax.random.split(jax.random.key(self.config.seed), self.config.n_sae)
        state = jax.vmap(self._init_one, in_axes=(0, None))(keys, b_dec_D)
        return {**state, "step": jnp.zeros((), jnp.int32)}

    # ---- step

    def _update_one(self, params, opt, stats, hyper, x_BD, coeff_scale, with_aux):
        c = self.config
        dead_F = stats["since_fired"] >= c.dead_window_tokens

        def loss_fn(p):
            enc = self.variant.encode_train(p, stats, x_BD, hyper, dead_F, with_aux)
            recon = enc.decode(p)
            mse = jnp.mean(jnp.sum((recon - x_BD) ** 2, axis=-1))
            loss = mse + coeff_scale * hyper["coeff"] * enc.penalty + enc.aux_loss
            return loss, (enc, recon, mse)

        (loss, (enc, recon, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if self.variant.unit_decoder:  # drop the radial part of the rows' gradient, then renormalise after the step
            W = params["W_dec"]
            grads["W_dec"] = grads["W_dec"] - jnp.sum(grads["W_dec"] * W, -1, keepdims=True) * W
        updates, opt = self.optimizer.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        if self.variant.unit_decoder:
            params["W_dec"] = params["W_dec"] / jnp.linalg.norm(params["W_dec"], axis=-1, keepdims=True)
        counts_F = enc.fire_counts()
        since = jnp.where(counts_F > 0, 0, jnp.minimum(stats["since_fired"] + x_BD.shape[0], 2 ** 30))
        stats = {**stats, **enc.stats, "since_fired": since}
        variance = jnp.sum((x_BD - x_BD.mean(0)) ** 2)
        metrics = {"loss": loss, "mse": mse, "fvu": jnp.sum((recon - x_BD) ** 2) / variance,
                   "l0": jnp.sum(counts_F) / x_BD.shape[0], "aux_loss": enc.aux_loss,
                   "dead_frac": jnp.mean(since >= c.dead_window_tokens)}
        return params, opt, stats, metrics

    def _step(self, state, x_raw_BD, input_scale, hyper):
        finite = jnp.all(jnp.isfinite(x_raw_BD))
        x = jnp.where(finite, x_raw_BD.astype(jnp.float32) * input_scale, 0.0)
        x = jax.lax.with_sharding_constraint(x, self.batch_sharding)
        warm = self.config.sparsity_warmup_steps
        coeff_scale = jnp.minimum((state["step"] + 1) / warm, 1.0) if warm else jnp.ones(())
        per_sae = (state["params"], state["opt"], state["stats"], hyper)

        def update(with_aux: bool):
            params, opt, stats, metrics = jax.vmap(partial(self._update_one, with_aux=with_aux),
                                                   in_axes=(0, 0, 0, 0, None, None))(*per_sae, x, coeff_scale)
            return {"params": params, "opt": opt, "stats": stats, "step": state["step"] + 1}, metrics

        def keep():  # a corrupted batch leaves the state as it was (the host stops one step later)
            metrics = jax.eval_shape(lambda: update(False)[1])
            return state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

        # One of three compiled branches runs: keep, update, or update with AuxK (only while a latent of the
        # sweep is dead). Branches, not masks, so the common case pays for neither.
        any_dead = jnp.any(state["stats"]["since_fired"] >= self.config.dead_window_tokens)
        branch = jnp.where(finite, 1 + any_dead.astype(jnp.int32), 0)
        new, metrics = jax.lax.switch(branch, [keep, partial(update, False), partial(update, True)])
        # Per SAE [n_sae]: are its parameters finite after this step? The host stops before saving or exporting a
        # state that fails it (a pass over the parameters: small next to the step's matmuls).
        params_finite = jnp.stack([jnp.all(jnp.isfinite(v.reshape(v.shape[0], -1)), axis=1)
                                   for v in jax.tree.leaves(new["params"])]).all(0)
        return new, {**metrics, "finite": finite, "params_finite": params_finite}

    def run_step(self, state, acts_BD: np.ndarray, input_scale: float):
        x = jax.device_put(np.asarray(acts_BD), self.batch_sharding)
        return self.step(state, x, jnp.float32(input_scale), self.hyper)


@dataclass
class TrainResult:
    config: SaeConfig
    variant: Variant
    state: dict  # host numpy train state; every array has the sweep axis (one row per SAE) first
    input_scale: float
    history: list[dict]  # logged metrics per SAE, one entry every log_every steps
    seconds: float = 0.0
    tokens: int = 0

    def sae(self, i: int = 0) -> Sae:
        """The i-th SAE of the sweep, for inference."""
        take = lambda tree: {k: np.asarray(v[i]) for k, v in tree.items()}  # noqa: E731
        return Sae(self.variant, take(self.state["params"]), take(self.state["stats"]), self.input_scale,
                   int(self.config.values("k")[i]))


def train_sae(config: SaeConfig, source: BatchSource | None = None, log: Callable[[str], None] | None = log,
              on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Trains config.n_sae SAEs for config.steps steps; resumes from config.out's checkpoints if present.

    source: token batches (default: the store at config.store, layer config.layer). on_step(step, metrics) is
    called with each step's host metrics (one step late). Raises NonFiniteBatchError on NaN/inf input,
    NonFiniteParamsError if the parameters diverge, CheckpointError if config.out's checkpoints were written with
    settings that change the math (emojax.sae.fingerprint), LockedError if another process writes config.out.
    """
    if not config.out:
        return _train(config, source, log, on_step)
    with WriterLock(config.out, what="SAE output"):
        return _train(config, source, log, on_step)


def _train(config: SaeConfig, source: BatchSource | None, log, on_step) -> TrainResult:
    log = log or (lambda *_: None)
    if source is None:
        from emojax.store.reader import ActivationStore

        source = StoreSource(ActivationStore(config.store), config.layer, config.batch_size, config.seed,
                             config.buffer_chunks)
    trainer = SaeTrainer(config, source.d_model)
    settings = fingerprint(config, source.d_model, trainer.variant, source_identity(source))
    ckpt = SaeCheckpoints(f"{config.out}/checkpoints", config.checkpoint_every) \
        if config.out and config.checkpoint_every else None
    meta = ckpt.meta() if ckpt else None
    if meta is not None:  # the settings first: another shape would fail the state's restore less clearly
        changed = differences(meta.get("fingerprint") or {}, settings)
        if changed:
            raise CheckpointError(f"{ckpt.directory}: written with other settings that change the math: "
                                  f"{'; '.join(changed)}. Rerun with the checkpoint's settings to resume, or use "
                                  "another sae.out to start over")
    restored = ckpt.restore(trainer.abstract_state) if meta is not None else None
    if restored is not None:
        state, meta = restored
        scale, position = float(meta["input_scale"]), int(meta["data_position"])
        log(f"sae: resuming at step {fmt(int(state['step']))} (data position {fmt(position)})")
    else:
        scale, b_dec = input_statistics(sample_rows(source, config.init_sample_tokens))
        state, position = trainer.init(jnp.asarray(b_dec)), 0
    step = int(state["step"])
    history: list[dict] = []
    pending = None  # (step, metrics on device, batch) of the previous step: read one step late
    t0, tokens = time.perf_counter(), 0

    def drain(item):
        s, metrics, batch = item
        host = jax.device_get(metrics)
        if not bool(host["finite"]):
            bad = ~np.isfinite(np.asarray(batch.acts, np.float32)).all(axis=1)
            raise NonFiniteBatchError(s, np.asarray(batch.rows)[bad])
        diverged = np.flatnonzero(~np.asarray(host["params_finite"]))
        if diverged.size:
            raise NonFiniteParamsError(s, diverged.tolist(), config)
        if on_step:
            on_step(s, host)
        if config.log_every and (s % config.log_every == 0 or s == config.steps):
            history.append({"step": s, **{k: np.asarray(v).tolist() for k, v in host.items()
                                          if k not in ("finite", "params_finite")}})
            log(f"sae step {fmt(s)}: " + " ".join(f"{k}={fmt(np.ravel(v))}" for k, v in host.items()
                                                  if k in ("mse", "fvu", "l0", "dead_frac")))

    try:
        batches = source.batches(position)
        while step < config.steps:
            batch = next(batches)
            state, metrics = trainer.run_step(state, batch.acts, scale)
            step, position, tokens = step + 1, batch.index + 1, tokens + len(batch.acts)
            if pending is not None:
                drain(pending)
            pending = (step, metrics, batch)
            if ckpt and (step % config.checkpoint_every == 0 or step == config.steps):
                drain(pending)  # never checkpoint past a bad batch or non-finite parameters
                pending = None
                ckpt.save(step, state, {"data_position": position, "input_scale": scale,
                                        "fingerprint": settings}, force=step == config.steps)
        if pending is not None:
            drain(pending)
    finally:
        if ckpt:
            ckpt.close()
    host_state = jax.device_get(state)
    return TrainResult(config, trainer.variant, host_state, scale, history, time.perf_counter() - t0, tokens)
