"""Time per stage for `emojax plan`: measured benchmark figures (device_kinds.BENCHMARKS) scaled to the job.

Each estimate is the work of the stage divided by a rate: the benchmark's FLOP/s (its tokens/s times its own
FLOPs per token, counted the same way), times the device kind's peak relative to the measured device, times the
devices the stage spreads over. FLOPs per token: ~2 x the weights a token meets in a forward (train: 3x that,
for the backward), 12 x d x latents per SAE for an SAE step. Decoding is bound by reading the weights, so its
time scales with the parameter count. Stages with no benchmark figure get no number, and say so.
"""

from __future__ import annotations

import math

from emojax.models.presets import SHAPES
from emojax.run.device_kinds import Benchmark, DeviceKind, benchmark, relative_speed
from emojax.run.plan_model import forward_flops_per_token

DECODE_BATCH = 32  # a steering generate (strengths x prompts rows) is costed as one step of the batch-32 figure


def _bench_flops(b: Benchmark) -> float:
    """FLOP/s the benchmark reached, counted as the estimates count."""
    if b.figure == "sae":
        return 12.0 * b.sae_d * b.sae_latents * b.tokens_per_s
    return forward_flops_per_token(SHAPES[b.shape], b.depth, b.head) * b.tokens_per_s


def _label(b: Benchmark, kind: DeviceKind, how: str) -> str:
    scaled = "" if kind.name == b.device else f", x{relative_speed(kind):.3g} for {kind.name} by peak bf16 FLOP/s"
    return f"estimate (from {b.source}, {b.date}; scaled by {how}{scaled})"


def _estimate(seconds: float, b: Benchmark, kind: DeviceKind, how: str) -> dict:
    return {"seconds": float(f"{seconds:.3g}"), "label": _label(b, kind, how)}  # 3 figures: it is a guess


def stage_times(names, kind: DeviceKind, model, *, tokens: int, dump_depth: int, sae, steer, steer_concepts: int,
                train=None, trained: bool = False, dump_devices: int = 1, hosts: int = 1) -> dict:
    """{stage: {"seconds": float or None, "label": str}} for the stages in `names`.

    model: the ModelConfig; tokens: the corpus's estimated tokens; dump_depth: the deepest captured residual
    index; sae, steer: the typed stage configs;
    train: the built-in model's TrainConfig (None for a given checkpoint); trained: it is cached already.
    """
    speed = relative_speed(kind)
    out = {}
    for name in names:
        if name == "train":
            if train is None or trained:
                out[name] = {"seconds": 0.0, "label": "nothing to train: " +
                             ("a given checkpoint" if train is None else "the built-in model is cached")}
                continue
            b = benchmark("forward", kind)
            work = 3 * forward_flops_per_token(model) * train.steps * train.batch_size * train.seq_len
            out[name] = _estimate(work / (_bench_flops(b) * speed), b, kind,
                                  "params, x3 for the backward, on 1 device")
        elif name == "dump":
            b = benchmark("dump", kind)
            depth = dump_depth
            work = forward_flops_per_token(model, depth, head=False) * tokens
            rate = _bench_flops(b) * speed * dump_devices * hosts
            out[name] = _estimate(work / rate, b, kind, f"params to layer {depth}, over {dump_devices} device(s)"
                                  + (f" x {hosts} hosts" if hosts > 1 else ""))
        elif name == "sae":
            b = benchmark("sae", kind)
            work = 12.0 * model.d_model * sae.n_latents * sae.n_sae * sae.steps * sae.batch_size
            devices = math.prod(sae.mesh)
            out[name] = _estimate(work / (_bench_flops(b) * speed * devices), b, kind,
                                  f"d x latents x {sae.n_sae} SAE(s), over {devices} device(s)")
        elif name == "steer":
            b32, b1 = benchmark("decode_b32", kind), benchmark("decode_b1", kind)
            ratio = forward_flops_per_token(model) / forward_flops_per_token(SHAPES[b32.shape])
            step = DECODE_BATCH / b32.tokens_per_s * ratio / speed
            seconds = steer_concepts * steer.max_new_tokens * step + steer.monitor_new_tokens * ratio / (
                b1.tokens_per_s * speed)
            out[name] = _estimate(seconds, b32, kind, f"params, {steer_concepts} concept(s) x "
                                                      f"{steer.max_new_tokens} decode steps, on 1 device")
        else:
            out[name] = {"seconds": None, "label": "not estimated: no benchmark figure for this stage"}
    return out
