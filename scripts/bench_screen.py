"""`emojax screen` throughput: samples/s and tokens/s of the whole pipeline, against a plain forward of the same
tokens in the same process.

    python scripts/bench_screen.py [--model-shape tiny|56m|1b] [--samples N] [--prompt-chars P]
                                   [--response-chars R] [--batch B] [--shards S] [--device cpu|gpu]

A random-init model of the named shape is saved to a temporary folder (byte tokenizer: one token per character of
the ASCII text), with a bank of two random unit directions recorded as fitted on it, and N plain rows of random
words (P characters of prompt, R of response). The pipeline (DirectRunner, one worker) runs once to compile, then
is timed on a fresh output folder; tokens/s counts the prompt and response tokens read and the model's own tokens
generated. In the same process, with the same loaded model and batches: the scorer alone (forward + own
response, no Beam) and a plain forward of the same prompt + response tokens at the same layer (the work a
projection without the own response needs). The ratios say what the own response and the pipeline cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SHAPE_NAMES, emit, env_info, log  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=sorted(SHAPE_NAMES), default="tiny")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--prompt-chars", type=int, default=48)
    p.add_argument("--response-chars", type=int, default=96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _text(rng, chars: int) -> str:
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 8)))) for _ in
             range(chars)]
    return " ".join(words)[:chars]


def _inputs(folder: Path, cfg, args):
    """A random-init checkpoint, a bank of two random unit directions at 2/3 of the depth, and the data file."""
    import numpy as np

    import emojax
    from emojax.concepts.bank import ConceptBank
    from emojax.models.identity import model_identity

    model = emojax.random_model(cfg, seed=args.seed).save(folder / "model")
    rng = np.random.default_rng(args.seed)
    layer = max(1, round(2 * cfg.n_layers / 3))
    vectors = rng.normal(size=(2, 1, cfg.d_model)).astype(np.float32)
    ConceptBank(names=("afraid", "calm"), layers=(layer,), vectors=vectors, raw=vectors,
                resid_norm=np.ones(1, np.float32), info={"model_identity": model_identity(model),
                                                         "store_model": str(model)}).save(folder / "bank")
    rows = [{"id": f"{i:06d}", "prompt": _text(rng, args.prompt_chars),
             "response": " " + _text(rng, args.response_chars)} for i in range(args.samples)]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before the first jax import
    import jax
    import numpy as np

    from emojax.models.presets import SHAPES
    from emojax.pipelines.screen import shard_of
    from emojax.screen.config import ScreenConfig
    from emojax.screen.run import plan, screen
    from emojax.screen.score import encode
    from emojax.tokenizer import left_pad

    shape = SHAPE_NAMES[args.model_shape]
    cfg = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = _inputs(folder, cfg, args)
        config = ScreenConfig(data=(str(data),), bank=str(folder / "bank"), concepts=("afraid", "calm"),
                              out=str(folder / "warm"), batch_size=args.batch, n_shards=args.shards,
                              max_new_tokens=args.response_chars + 1, mesh=(1, 1, 1))
        log(f"bench_screen: {shape} ({args.device}) {args.samples} samples of {args.prompt_chars} + "
            f"{args.response_chars} characters, batch {args.batch}, {args.shards} shards")
        t0 = time.perf_counter()
        screen(config)  # compiles
        first = time.perf_counter() - t0
        t = screen(dataclasses.replace(config, out=str(folder / "timed")))["throughput"]

        planned = plan(config, log)
        scorer = planned.spec.load()  # the one the pipeline ran with (DirectRunner: this process)
        shards = [sorted((s for s in planned.samples if shard_of(s.sample_id, args.shards) == i),
                         key=lambda s: s.sample_id) for i in range(args.shards)]
        t0 = time.perf_counter()
        for shard in shards:
            scorer.score(shard)
        scorer_s = time.perf_counter() - t0

        lm, B = scorer.lm, args.batch
        batches = [[encode(s, scorer.tokenizer, scorer.limit).ids for s in shard[i:i + B]]
                   for shard in shards for i in range(0, len(shard), B)]

        def forward():
            for ids in batches:
                tokens, mask = left_pad(ids + [ids[0]] * (B - len(ids)), max(len(x) for x in ids))
                np.asarray(lm(tokens, mask, capture=(planned.spec.layer,), logits=False).hidden[0])

        forward()  # compiles
        t0 = time.perf_counter()
        forward()
        forward_s = time.perf_counter() - t0
    record = {"bench": "screen", "model_shape": shape, "device": args.device, "samples": args.samples,
              "tokens": t["tokens"], "pipeline_s": t["seconds"], "samples_per_s": t["samples_per_s"],
              "tokens_per_s": t["tokens_per_s"], "first_run_s": first, "scorer_s": scorer_s, "forward_s": forward_s,
              "pipeline_over_scorer": t["seconds"] / scorer_s, "pipeline_over_forward": t["seconds"] / forward_s,
              **env_info()}
    emit(record)
    log(f"bench_screen: {t['samples_per_s']:.1f} samples/s, {t['tokens_per_s']:.0f} tokens/s "
        f"({t['seconds']:.2f} s for {args.samples} samples; first run with compilation {first:.1f} s); the scorer "
        f"alone {scorer_s:.2f} s (pipeline x{t['seconds'] / scorer_s:.2f}), a plain forward of the same tokens "
        f"{forward_s:.2f} s (pipeline x{t['seconds'] / forward_s:.2f}) on {jax.default_backend()}")


if __name__ == "__main__":
    main()
