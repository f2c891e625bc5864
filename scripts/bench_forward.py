"""Forward pass with two captured residual streams: emojax vs transformers' LlamaForCausalLM, same process.

    python scripts/bench_forward.py [--model-shape tiny|56m|1b] [--batch B] [--seq T] [--iters N]
                                    [--rounds R] [--dtype float32|bfloat16] [--device cpu|gpu]

Both sides get the same random token batch, the same model shape and dtype (random weights, not the same
values), and do the same work per iteration: a full forward producing logits [B, T, V] plus the residual
stream at two layers (n_layers // 3 and 2 * n_layers // 3, Hugging Face `output_hidden_states` indexing),
with those two hidden states copied to host numpy and the logits left on the device but finished.

emojax is warmed up (traced + compiled) first; the first call is reported as `emojax_compile_s`. Then the two
sides are timed alternately for `--rounds` rounds of `--iters` calls (one untimed warmup call per round), so a
shared machine's drift hits both alike; tokens/s = B * T / median seconds per call, and the JSON line also
carries every round's ratio.
Thread counts are left at the libraries' defaults (torch uses all cores; reported as "threads").
Nothing is downloaded: transformers runs offline and the models are randomly initialised.

CPU figures are only meaningful on an otherwise idle machine: `*_foreign_cores` records how many cores other
processes kept busy during each timed section (torch's OpenMP threads slow down far more than XLA's under
contention, so a busy machine also skews the ratio). Rerun when they are not near 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SHAPE_NAMES, emit, env_info, log, start_against_torch, timed_rounds  # noqa: E402



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=sorted(SHAPE_NAMES), default="56m")
    p.add_argument("--batch", type=int, default=None, help="default 8 (16 for 1b on gpu)")
    p.add_argument("--seq", type=int, default=None, help="default 256 (1024 for 1b on gpu)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="alternate the two sides this many times")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default float32 (bfloat16 for 1b on gpu)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--attention", choices=["xla", "cudnn", "auto", "xla-fused"], default="xla",
                   help="emojax's attention kernel (emojax.models.layers.attention_kernel)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    gpu_1b = args.device == "gpu" and args.model_shape == "1b"
    if args.batch is None:
        args.batch = 16 if gpu_1b else 8
    if args.seq is None:
        args.seq = 1024 if gpu_1b else 256
    if args.dtype is None:
        args.dtype = "bfloat16" if gpu_1b else "float32"
    return args


def capture_layers(n_layers: int) -> tuple[int, int]:
    return (n_layers // 3, 2 * n_layers // 3)


def emojax_step(cfg, tokens, capture, dtype: str, seed: int, attention: str = "xla"):
    import jax
    import numpy as np

    import emojax

    lm = emojax.random_model(cfg, dtype=dtype, mesh=None, seed=seed, attention=attention)
    jax.block_until_ready(lm.params)

    def step():
        out = lm(tokens, capture=capture)
        hidden = [np.asarray(h) for h in out.hidden]  # device -> host copy of the captured streams
        out.logits.block_until_ready()
        return hidden

    t0 = time.perf_counter()
    step()  # trace + compile + one run
    compile_s = time.perf_counter() - t0
    return step, compile_s, lm.num_params


def hf_llama(cfg, dtype: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.architecture != "llama" or cfg.rope.kind != "default" or cfg.qkv_bias or cfg.mlp_bias:
        raise ValueError("the baseline is a plain LlamaForCausalLM; this shape has features it does not model")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope.theta},
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        use_cache=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    model = model.to(getattr(torch, dtype)).eval()
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected sdpa attention, got {model.config._attn_implementation!r}")
    return model


def to_numpy(t):
    """torch tensor -> host numpy without changing dtype (bfloat16 becomes ml_dtypes.bfloat16, like jax)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def baseline_step(cfg, tokens, capture, dtype: str, device: str, seed: int):
    import torch

    torch.manual_seed(seed)
    torch_device = "cuda" if device == "gpu" else "cpu"
    model = hf_llama(cfg, dtype, torch_device)
    ids = torch.from_numpy(tokens.astype("int64")).to(torch_device)
    sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

    def step():
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            hidden = [to_numpy(out.hidden_states[i]) for i in capture]
            sync()  # logits stay on the device, finished
        return hidden

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    args = parse_args(argv)
    shape, cfg = start_against_torch(args.device, args.model_shape)
    import numpy as np
    import torch

    B, T = args.batch, args.seq
    capture = capture_layers(cfg.n_layers)
    tokens = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, size=(B, T), dtype=np.int32)
    log(f"bench_forward: {shape} ({args.dtype}, {args.device}) B={B} T={T} capture={capture} iters={args.iters}")

    emo_step, compile_s, emo_params = emojax_step(cfg, tokens, capture, args.dtype, args.seed, args.attention)
    base_step, base_params = baseline_step(cfg, tokens, capture, args.dtype, args.device, args.seed)
    rounds = timed_rounds({"emojax": emo_step, "transformers": base_step}, args.iters, args.rounds)
    ratios = [b["median"] / e["median"] for e, b in zip(rounds["emojax"], rounds["transformers"])]
    emo = {"compile": compile_s, "median": statistics.median(r["median"] for r in rounds["emojax"]),
           "mean": statistics.fmean(r["mean"] for r in rounds["emojax"]),
           "foreign_cores": max(r["foreign_cores"] or 0 for r in rounds["emojax"])}
    base = {"first": rounds["transformers"][0]["first"],
            "median": statistics.median(r["median"] for r in rounds["transformers"]),
            "mean": statistics.fmean(r["mean"] for r in rounds["transformers"]),
            "foreign_cores": max(r["foreign_cores"] or 0 for r in rounds["transformers"])}
    log(f"  emojax:       compile+first call {compile_s:.2f}s, median {emo['median'] * 1e3:.1f} ms, "
        f"{B * T / emo['median']:,.0f} tok/s")
    log(f"  transformers: median {base['median'] * 1e3:.1f} ms, {B * T / base['median']:,.0f} tok/s")
    log(f"  per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    for name, r in (("emojax", emo), ("transformers", base)):
        if args.device == "cpu" and r["foreign_cores"] > 0.25:
            log(f"  warning: other processes kept {r['foreign_cores']:.2f} cores busy during the {name} timing")
    if emo_params != base_params:
        log(f"  warning: parameter counts differ: emojax {emo_params:,} vs transformers {base_params:,}")

    emo_tok_s, base_tok_s = B * T / emo["median"], B * T / base["median"]
    info = env_info()
    record = {
        "bench": "forward_capture", "shape": shape, "device": args.device, "dtype": args.dtype,
        "attention": args.attention,
        "batch": B, "seq": T, "capture": list(capture), "iters": args.iters,
        "emojax_tok_s": emo_tok_s, "baseline_tok_s": base_tok_s, "ratio": emo_tok_s / base_tok_s,
        "rounds": args.rounds, "round_ratios": ratios, "median_round_ratio": statistics.median(ratios),
        "emojax_compile_s": compile_s,
        "emojax_median_s": emo["median"], "emojax_mean_s": emo["mean"],
        "baseline_median_s": base["median"], "baseline_mean_s": base["mean"],
        "baseline_first_s": base["first"], "params": emo_params,
        # CPU cores kept busy by other processes during each timed section (CPU timings are only
        # trustworthy when these are near 0).
        "emojax_foreign_cores": emo["foreign_cores"], "baseline_foreign_cores": base["foreign_cores"],
        "threads": torch.get_num_threads(),
        **{k: info[k] for k in ("jax_version", "torch_version", "transformers_version", "jax_backend",
                                "jax_device", "cpu_count") if k in info},
    }
    if "apache_beam" in sys.modules:
        log("  warning: apache_beam got imported")
    emit(record)
    log(f"  ratio emojax/transformers = {record['ratio']:.2f}x")


if __name__ == "__main__":
    main()
