"""Steered greedy generation: emojax's compiled decode loop vs transformers' generate with a forward hook.

    python scripts/bench_decode.py [--model-shape tiny|56m|1b] [--batch 1 32] [--new-tokens 128]
                                   [--prompt-len 16] [--rounds R] [--dtype float32|bfloat16] [--device cpu|gpu]

Both sides run the same weights (emojax's random model written with lm.save and read back by transformers'
from_pretrained), the same random prompts, and add the same vector (strength x a random direction of norm 1)
to the residual stream after layer n_layers // 2 at every position, the usual host-side hook:
`register_forward_hook` on that decoder layer. Both generate exactly --new-tokens tokens greedily
(transformers: min_new_tokens = max_new_tokens, no EOS). tokens/s = batch * new tokens / seconds per
generate call (prefill included). The generated tokens of the two sides are compared and the agreement is
reported (float32: they should agree, up to rare near-ties). Where a row's tokens part, transformers scores the
common prefix once more: `near_tie_divergences` counts the rows whose first differing token was within rounding
of transformers' own choice (its logit margin over emojax's token <= 2^-7 x the top logit's size in bf16, 1e-4
in float32), so a low agreement from near-tied logits of random weights is told apart from a wrong decode.

emojax is warmed up (compiled) first; its first call is reported as `emojax_compile_s`. The sides are then
timed alternately for --rounds rounds (one untimed call each per round, then --iters timed calls) so drift of
a shared machine hits both alike; every round's ratio is in the JSON line. `*_foreign_cores` records how many
cores other processes kept busy during each side's timing (CPU figures mean little when it is not near 0).
emojax decodes with its default configuration (unrolled layers) unless --scan-layers. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SHAPE_NAMES, emit, env_info, log, start_against_torch, timed_rounds  # noqa: E402



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=sorted(SHAPE_NAMES), default="56m")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strength", type=float, default=4.0, help="norm of the added vector")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default float32 (bfloat16 for 1b on gpu)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan-layers", action="store_true",
                   help="decode with a scan over the layers (DecodeConfig(unroll_layers=False)) instead of unrolled")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "gpu" and args.model_shape == "1b" else "float32"
    return args


def emojax_side(lm, tokens, vector, layer: int, new_tokens: int, unroll: bool):
    import jax
    import numpy as np

    from emojax.steer import DecodeConfig, Decoder, Interventions

    cfg = lm.config
    B, T = tokens.shape
    decoder = Decoder(lm, DecodeConfig(prompt_buckets=(T,), new_token_buckets=(new_tokens,), unroll_layers=unroll))
    iv = Interventions.empty(B, cfg.n_layers, cfg.d_model).add(vector, layers=(layer,), strengths=1.0)

    def step():
        gen = decoder.generate(tokens, max_new_tokens=new_tokens, interventions=iv)
        jax.block_until_ready(gen.tokens)
        return np.asarray(gen.tokens)[:, T:]

    t0 = time.perf_counter()
    out = step()
    return step, time.perf_counter() - t0, out, decoder


def transformers_side(path, tokens, vector, layer: int, new_tokens: int, dtype: str, device: str):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch_device = "cuda" if device == "gpu" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(torch_device).eval()
    v = torch.from_numpy(vector).to(torch_device, getattr(torch, dtype))

    def add_vector(module, args, output):  # residual index `layer` = output of decoder layer `layer - 1`
        if isinstance(output, tuple):
            return (output[0] + v, *output[1:])
        return output + v

    model.model.layers[layer - 1].register_forward_hook(add_vector)
    ids = torch.from_numpy(tokens.astype("int64")).to(torch_device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if torch_device == "cuda" else (lambda: None)

    def step():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            sync()
        return out[:, tokens.shape[1]:].cpu().numpy().astype(np.int32)

    def next_logits(prefix) -> np.ndarray:
        """[V] float32: the steered model's logits for the token after `prefix` (1-D token ids)."""
        with torch.inference_mode():
            ids = torch.from_numpy(np.asarray(prefix, np.int64)[None]).to(torch_device)
            return model(ids).logits[0, -1].float().cpu().numpy()

    return step, next_logits


def divergences(prompts, emo_tokens, base_tokens, next_logits, dtype: str) -> dict:
    """Where each row's generations part first, and whether transformers' choice there was a near-tie."""
    import numpy as np

    tolerance = 2.0 ** -7 if dtype == "bfloat16" else 1e-4
    first, near_ties = [], 0
    for prompt, emo, base in zip(prompts, emo_tokens, base_tokens):
        differ = np.flatnonzero(emo != base)
        if not differ.size:
            continue
        p = int(differ[0])
        logits = next_logits(np.concatenate([prompt, base[:p]]))
        margin = float(logits[base[p]] - logits[emo[p]])
        first.append(p)
        near_ties += margin <= tolerance * max(1.0, float(np.abs(logits).max()))
    return {"diverged_rows": len(first), "first_divergence_median": float(np.median(first)) if first else None,
            "near_tie_divergences": near_ties}


def main(argv=None) -> None:
    args = parse_args(argv)
    shape, cfg = start_against_torch(args.device, args.model_shape)
    import numpy as np
    import torch

    import emojax

    lm = emojax.random_model(cfg, dtype=args.dtype, seed=args.seed)
    layer = cfg.n_layers // 2
    rng = np.random.default_rng(args.seed)
    direction = rng.normal(size=cfg.d_model)
    vector = (args.strength * direction / np.linalg.norm(direction)).astype(np.float32)
    info = env_info()
    with tempfile.TemporaryDirectory() as tmp:
        lm.save(tmp)
        for B in args.batch:
            tokens = rng.integers(0, cfg.vocab_size, size=(B, args.prompt_len), dtype=np.int32)
            log(f"bench_decode: {shape} ({args.dtype}, {args.device}) batch {B}, prompt {args.prompt_len}, "
                f"{args.new_tokens} new tokens, vector of norm {args.strength} at residual index {layer}")
            emo_step, compile_s, emo_tokens, decoder = emojax_side(lm, tokens, vector, layer, args.new_tokens,
                                                                   unroll=not args.scan_layers)
            base_step, next_logits = transformers_side(tmp, tokens, vector, layer, args.new_tokens, args.dtype,
                                                       args.device)
            base_tokens = base_step()
            agreement = float(np.mean(emo_tokens == base_tokens))
            parted = divergences(tokens, emo_tokens, base_tokens, next_logits, args.dtype)
            rounds = timed_rounds({"emojax": emo_step, "transformers": base_step}, args.iters, args.rounds)
            ratios = [b["median"] / e["median"] for e, b in zip(rounds["emojax"], rounds["transformers"])]
            emo_s = statistics.median(r["median"] for r in rounds["emojax"])
            base_s = statistics.median(r["median"] for r in rounds["transformers"])
            n = B * args.new_tokens
            record = {
                "bench": "steered_decode", "shape": shape, "device": args.device, "dtype": args.dtype,
                "batch": B, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "layer": layer,
                "emojax_tok_s": n / emo_s, "baseline_tok_s": n / base_s, "ratio": base_s / emo_s,
                "rounds": args.rounds, "round_ratios": ratios, "median_round_ratio": statistics.median(ratios),
                "emojax_compile_s": compile_s, "emojax_median_s": emo_s, "baseline_median_s": base_s,
                "emojax_traces": decoder.trace_count, "token_agreement": agreement, **parted,
                "unroll_layers": not args.scan_layers,
                "emojax_foreign_cores": max(r["foreign_cores"] or 0 for r in rounds["emojax"]),
                "baseline_foreign_cores": max(r["foreign_cores"] or 0 for r in rounds["transformers"]),
                "threads": torch.get_num_threads(),
                **{k: info[k] for k in ("jax_version", "torch_version", "transformers_version", "jax_backend",
                                        "jax_device", "cpu_count") if k in info},
            }
            log(f"  emojax {n / emo_s:,.0f} tok/s (compile+first {compile_s:.1f}s), transformers "
                f"{n / base_s:,.0f} tok/s, ratio {record['ratio']:.2f}x (rounds: "
                f"{', '.join(f'{r:.2f}' for r in ratios)}), token agreement {agreement:.3f}"
                + (f"; {parted['diverged_rows']} of {B} rows part, at token {parted['first_divergence_median']:.0f} "
                   f"(median), {parted['near_tie_divergences']} of them at a near-tie" if parted["diverged_rows"]
                   else ""))
            emit(record)


if __name__ == "__main__":
    main()
