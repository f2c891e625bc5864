"""Pallas kernels vs their pure-JAX references, on the current backend: sparse_decode, forward and forward+backward.

    python scripts/bench_kernels.py [--device cpu|gpu] [--B 4096] [--K 32] [--F 32768] [--D 2048]
                                    [--iters N] [--rounds R] [--block-b 32] [--block-d 128] [--block-f 16]
                                    [--chunk 32] [--num-warps 4]

Both sides are jitted and get the same random inputs (idx uniform over F). "forward" times out_BD; "forward_
backward" times the loss sum(out_BD * probe_BD) with its gradients w.r.t. vals_BJ and W_FD. Compilation is
excluded (each side's first call is reported as *_compile_s); the sides are timed alternately for --rounds
rounds of --iters calls. One JSON line per figure: kernel_ms, reference_ms (medians) and ratio =
reference_ms / kernel_ms (> 1: the kernel is faster), plus the largest error of the kernel against the
reference (relative to the reference's largest magnitude) for the output and each gradient, so the first run
on a new backend is also a correctness check.

On CPU the kernels run in Pallas interpret mode (`kernel_mode: interpret`): that mode exists for correctness
tests, and the ratio there is no performance claim. emojax uses a kernel only where this benchmark shows it
faster on that backend. CPU defaults are small (B 256, K 16, F 1024, D 256); --device gpu defaults to
B 4096, K 32, F 32768, D 2048. The block-size flags are for tuning on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import emit, env_info, log, time_fn, timed_rounds  # noqa: E402

DEFAULT_SHAPES = {"cpu": dict(B=256, K=16, F=1024, D=256), "gpu": dict(B=4096, K=32, F=32768, D=2048)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    for axis, meaning in (("B", "tokens"), ("K", "latents per token"), ("F", "latents"), ("D", "model width")):
        p.add_argument(f"--{axis}", type=int, help=f"{meaning} (default: per --device)")
    p.add_argument("--iters", type=int, help="timed calls per round and side (default 3 on cpu, 20 on gpu)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-b", type=int, default=32)
    p.add_argument("--block-d", type=int, default=128)
    p.add_argument("--block-f", type=int, default=16)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--num-warps", type=int, default=4)
    args = p.parse_args(argv)
    for axis, size in DEFAULT_SHAPES[args.device].items():
        if getattr(args, axis) is None:
            setattr(args, axis, size)
    args.iters = args.iters or (20 if args.device == "gpu" else 3)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from emojax.kernels import reference_sparse_decode, sparse_decode

    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: jax's default backend is {jax.default_backend()!r}")
    interpret = jax.default_backend() == "cpu"
    B, K, F, D = args.B, args.K, args.F, args.D
    blocks = dict(block_b=args.block_b, block_d=args.block_d, block_f=args.block_f, chunk=args.chunk,
                  num_warps=args.num_warps)
    rng = np.random.default_rng(args.seed)
    vals_BJ = jnp.asarray(rng.normal(size=(B, K)), jnp.float32)
    idx_BJ = jnp.asarray(rng.integers(0, F, size=(B, K)), jnp.int32)
    W_FD = jnp.asarray(rng.normal(size=(F, D)) / np.sqrt(D), jnp.float32)
    probe_BD = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    decoders = {"kernel": lambda v, i, w: sparse_decode(v, i, w, interpret=interpret, **blocks),
                "reference": reference_sparse_decode}

    def loss_and_grads(decode):
        return jax.jit(jax.value_and_grad(lambda v, w: jnp.sum(decode(v, idx_BJ, w) * probe_BD), (0, 1)))

    benches = {
        "forward": {name: jax.jit(decode) for name, decode in decoders.items()},
        "forward_backward": {name: loss_and_grads(decode) for name, decode in decoders.items()},
    }
    bench_args = {"forward": (vals_BJ, idx_BJ, W_FD), "forward_backward": (vals_BJ, W_FD)}
    mode = "interpret" if interpret else "compiled"
    info = env_info()
    log(f"bench_kernels: sparse_decode B={B} K={K} F={F} D={D} on {info['jax_device']} ({mode}), "
        f"{args.rounds} rounds x {args.iters} calls")
    if interpret:
        log("  interpret mode: the kernels run for correctness only; the ratios below are no performance claim")

    for bench, fns in benches.items():
        steps = {name: lambda fn=fn: jax.block_until_ready(fn(*bench_args[bench])) for name, fn in fns.items()}
        compile_s = {name: time_fn(step, iters=1, warmup=1)["first"] for name, step in steps.items()}
        results = {name: step() for name, step in steps.items()}
        rounds = timed_rounds(steps, args.iters, args.rounds)
        ms = {name: 1e3 * statistics.median(r["median"] for r in rounds[name]) for name in fns}
        errors = _relative_errors(results["kernel"], results["reference"], bench)
        record = {
            "bench": f"sparse_decode_{bench}", "device": args.device, "shapes": dict(B=B, K=K, F=F, D=D),
            "kernel_ms": ms["kernel"], "reference_ms": ms["reference"], "ratio": ms["reference"] / ms["kernel"],
            "kernel_mode": mode, "performance_claim": not interpret,
            "round_ratios": [float(f"{r['median'] / k['median']:.4g}")
                             for k, r in zip(rounds["kernel"], rounds["reference"])],
            "kernel_compile_s": compile_s["kernel"], "reference_compile_s": compile_s["reference"],
            **errors, "blocks": blocks, "iters": args.iters, "rounds": args.rounds,
            "foreign_cores": max((r["foreign_cores"] or 0) for side in rounds.values() for r in side),
            **{k: info[k] for k in ("jax_version", "jax_backend", "jax_device", "cpu_count") if k in info},
        }
        emit(record)
        log(f"  {bench}: kernel {ms['kernel']:.2f} ms, reference {ms['reference']:.2f} ms, "
            f"ratio {record['ratio']:.3g}; max rel err " +
            ", ".join(f"{k.removeprefix('max_rel_err_')} {v:.2g}" for k, v in errors.items()))
        if max(errors.values()) > 1e-4:
            log(f"  warning: the kernel disagrees with the reference ({errors})")


def _relative_errors(got, want, bench) -> dict:
    """Largest |kernel - reference| relative to the reference's largest magnitude, per output."""
    import jax.numpy as jnp
    names = ["out"] if bench == "forward" else ["loss", "d_vals", "d_W"]
    pairs = [(got, want)] if bench == "forward" else [(got[0], want[0]), (got[1][0], want[1][0]),
                                                       (got[1][1], want[1][1])]
    return {f"max_rel_err_{name}": float(jnp.abs(g - w).max() / jnp.maximum(jnp.abs(w).max(), 1e-30))
            for name, (g, w) in zip(names, pairs)}


if __name__ == "__main__":
    main()
