"""SAE training throughput: emojax's TopK trainer vs a plain PyTorch TopK SAE, same sizes, same run.

    python scripts/bench_sae.py [--device cpu|gpu] [--d 512] [--latents 4096] [--k 32] [--batch 1024]
                                [--steps 20] [--rounds 3] [--decoder auto|dense|gather]

Both sides train a TopK SAE on the same random batches (float32, already in memory) with Adam (lr 1e-4):
encode (x - b_dec) W_enc + b_enc, top-k, scatter into a dense code, decode, summed squared error, backward,
decoder-row gradient projection and renormalisation (the PyTorch baseline is written out below). emojax's step
also does what its trainer always does: AuxK against dead latents, dead-latent counters, and metrics (FVU, L0)
as outputs, read one step late. Compilation is excluded (warm-up steps first). Rounds alternate emojax and
PyTorch so a noisy machine affects both. Figures: tokens/s of each side and emojax / PyTorch.
GPU defaults: --d 2048 --latents 32768 --batch 4096.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import emit, env_info, log  # noqa: E402


class TorchTopK:
    """The baseline: a plain PyTorch TopK SAE training step."""

    def __init__(self, d, f, k, lr, device):
        import torch

        self.torch, self.k = torch, k
        g = torch.Generator().manual_seed(0)
        W = torch.randn(f, d, generator=g, dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = W.clone().to(device).requires_grad_()
        self.W_enc = W.T.contiguous().to(device).requires_grad_()
        self.b_enc = torch.zeros(f, dtype=torch.float32, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d, dtype=torch.float32, device=device, requires_grad=True)
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def step(self, x):
        torch = self.torch
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        recon = acts @ self.W_dec + self.b_dec
        loss = (recon - x).pow(2).sum(-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec
        self.opt.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)
        return loss

    def sync(self, out):
        out.item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--d", type=int)
    ap.add_argument("--latents", type=int)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-batches", type=int, default=8, help="distinct random batches cycled through")
    ap.add_argument("--decoder", choices=("auto", "dense", "gather"), default="auto",
                    help="emojax's sae.decoder (auto: gather on CPU, dense on GPU)")
    args = ap.parse_args()
    gpu = args.device == "gpu"
    d = args.d or (2048 if gpu else 512)
    f = args.latents or (32768 if gpu else 4096)
    batch = args.batch or (4096 if gpu else 1024)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from emojax.sae import SaeConfig, SaeTrainer

    if gpu and jax.devices()[0].platform != "gpu":
        raise SystemExit("--device gpu: JAX sees no GPU")
    tdev = "cuda" if gpu else "cpu"
    rng = np.random.default_rng(0)
    xs = [(rng.normal(size=(batch, d)) / np.sqrt(d)).astype(np.float32) for _ in range(args.n_batches)]

    config = SaeConfig(variant="topk", n_latents=f, k=args.k, batch_size=batch, steps=10 ** 6, lr=1e-4,
                       lr_warmup_steps=0, aux_k=256, dead_after_tokens=10_000_000, mesh=(1, 1),
                       decoder=args.decoder)
    trainer = SaeTrainer(config, d)
    state = trainer.init(jnp.zeros((d,), jnp.float32))
    jx = [jax.device_put(x, trainer.batch_sharding) for x in xs]
    scale = jnp.float32(1.0)
    baseline = TorchTopK(d, f, args.k, 1e-4, tdev)
    tx = [torch.from_numpy(x).to(tdev) for x in xs]

    def run_emojax(n):
        nonlocal state
        pending = None
        for i in range(n):
            state, metrics = trainer.step(state, jx[i % len(jx)], scale, trainer.hyper)
            if pending is not None:
                jax.device_get(pending["fvu"])  # metrics read one step late, as the trainer does
            pending = metrics
        jax.block_until_ready(state)

    def run_torch(n):
        out = None
        for i in range(n):
            out = baseline.step(tx[i % len(tx)])
        baseline.sync(out)
        if gpu:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    run_emojax(2)
    log(f"emojax warm-up (compile) {time.perf_counter() - t0:.1f}s")
    run_torch(2)
    times = {"emojax": [], "torch": []}
    for r in range(args.rounds):
        for name, fn in (("emojax", run_emojax), ("torch", run_torch)) if r % 2 == 0 else \
                (("torch", run_torch), ("emojax", run_emojax)):
            t0 = time.perf_counter()
            fn(args.steps)
            times[name].append(time.perf_counter() - t0)
            log(f"round {r} {name}: {args.steps * batch / times[name][-1]:,.0f} tokens/s")
    tps = {name: args.steps * batch / statistics.median(t) for name, t in times.items()}
    record = {"bench": "sae_topk_train", "device": args.device, "d": d, "latents": f, "k": args.k, "batch": batch,
              "steps": args.steps, "rounds": args.rounds, "emojax_tokens_per_s": tps["emojax"],
              "decoder": "gather" if trainer.variant.gather_decode else "dense",
              "torch_tokens_per_s": tps["torch"], "ratio": tps["emojax"] / tps["torch"],
              "round_seconds": times, "torch_threads": torch.get_num_threads(), "env": env_info()}
    emit(record)
    log(f"emojax {tps['emojax']:,.0f} tok/s, torch {tps['torch']:,.0f} tok/s, ratio {record['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
