"""Activation dump: `emojax dump` (forward + capture + TensorStore writes) vs a transformers activation cache.

    python scripts/bench_dump.py [--model-shape tiny|56m|1b] [--device cpu|gpu] [--docs N] [--layer I]
                                 [--dtype float32|bfloat16] [--buckets T ...] [--full-depth]

Both sides read the same corpus (built-in generator stories, byte tokens, truncated to --max-tokens), run the
same random-init model (emojax writes it with lm.save, transformers loads that folder: the same weights) over
the same batches (the dump's bucket plan: right-padded, fixed shapes per bucket), and copy the same layer's
activations of the real tokens to host memory. emojax also writes them to a local TensorStore (bf16 tokens,
float32 pooled means) and commits every write; transformers keeps them in host memory only (the pattern of
activation caches such as SAELens' or TransformerLens' run_with_cache). Compilation is excluded: emojax first
dumps a small warm-up corpus with one document per bucket, transformers runs one batch per bucket.

emojax runs the layers up to the captured one and skips the unembedding (the dump needs neither); transformers'
forward with output_hidden_states runs them all. --full-depth also times emojax capturing the last layer (all
layers, still no unembedding), so the share of the ratio that comes from skipping work is visible.

Figures: tokens/s (real tokens, padding excluded) and MB/s of activations copied to host (emojax: written).
The corpus is written directly with pyarrow in the corpus stage's format, so no Beam is needed (the GPU image
has none). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ForeignLoad, emit, env_info, log, offline  # noqa: E402

SHAPE_NAMES = {"tiny": "tiny", "56m": "llama-56m", "1b": "tinyllama-1.1b"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-shape", choices=sorted(SHAPE_NAMES), default="56m")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--docs", type=int, default=None, help="documents (default 120 on cpu, 4000 on gpu)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--layer", type=int, default=None, help="residual index to capture (default 2/3 depth)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="model dtype (default float32 on cpu, bfloat16 on gpu)")
    p.add_argument("--tokens-per-batch", type=int, default=None, help="default 4096 cpu, 16384 gpu")
    p.add_argument("--buckets", type=int, nargs="+", default=None,
                   help="padded lengths, each compiled once (default: the dump's default buckets up to "
                        "--max-tokens; the generated documents are mostly --max-tokens long)")
    p.add_argument("--full-depth", action="store_true", help="also time emojax capturing the last layer")
    p.add_argument("--workdir", default=None, help="where the corpus and stores go (default: a temp folder)")
    args = p.parse_args(argv)
    gpu = args.device == "gpu"
    args.docs = args.docs or (4000 if gpu else 120)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.tokens_per_batch = args.tokens_per_batch or (16384 if gpu else 4096)
    if args.buckets and max(args.buckets) < args.max_tokens:
        p.error(f"--buckets: the largest, {max(args.buckets)}, must be at least --max-tokens ({args.max_tokens})")
    return args


def write_corpus(out: Path, docs: list[tuple[str, int, str, list[int]]], max_tokens: int, tokenizer_sha: str,
                 label_ids: dict[str, int], n_shards: int = 2) -> None:
    """Writes docs [(doc_id, label_id, split, tokens)] as corpus-stage shards + manifest.json (no Beam)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(n_shards):
        part = sorted(docs[i::n_shards])
        table = pa.table({"doc_id": [d[0] for d in part], "label_id": pa.array([d[1] for d in part], pa.int32()),
                          "split": [d[2] for d in part],
                          "tokens": pa.array([d[3] for d in part], pa.list_(pa.int32())),
                          "n_tokens": pa.array([len(d[3]) for d in part], pa.int32())})
        name = f"part-{i:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(table, out / "shards" / name)
        data = (out / "shards" / name).read_bytes()
        shards.append({"name": name, "rows": len(part), "tokens": sum(len(d[3]) for d in part),
                       "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": "emojax-corpus-v1", "config_sha256": "bench", "tokenizer": "byte",
                "tokenizer_sha256": tokenizer_sha, "max_tokens": max_tokens, "label_ids": label_ids,
                "shards": shards, "documents_written": len(docs), "tokens_written": sum(s["tokens"] for s in shards)}
    (out / "manifest.json").write_text(json.dumps(manifest))


def corpus_docs(n: int, max_tokens: int):
    from emojax.corpus.catalogue import load_catalogue
    from emojax.corpus.generator import GeneratorConfig, generate
    from emojax.tokenizer import ByteTokenizer

    names = load_catalogue().names_list
    concepts = tuple(names[:: max(1, len(names) // 24)])[:24]
    records = list(generate(GeneratorConfig(concepts=concepts, n_topics=max(2, n // (len(concepts) * 2) + 1),
                                            stories_per_topic=2)))
    tok = ByteTokenizer()
    label_ids = {name: i for i, name in enumerate(names)} | {"neutral": -1}
    docs = []
    for r in records[:n]:
        docs.append((r.doc_id, label_ids.get(r.label, -1), "train", tok.encode(r.text)[:max_tokens]))
    return docs, tok.fingerprint, label_ids


def main(argv=None) -> None:
    args = parse_args(argv)
    offline()
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    import torch
    import transformers

    import emojax
    from emojax.store import DumpConfig, dump
    from emojax.store.batches import batch_arrays, plan_batches
    from emojax.store.config import default_buckets
    from emojax.store.corpus_shards import read_manifest, read_shard

    work = Path(args.workdir or tempfile.mkdtemp(prefix="emojax-bench-dump-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    docs, tokenizer_sha, label_ids = corpus_docs(args.docs, args.max_tokens)
    write_corpus(work / "corpus", docs, args.max_tokens, tokenizer_sha, label_ids)
    buckets = tuple(sorted(args.buckets)) if args.buckets else default_buckets(args.max_tokens)
    warm_docs = [(f"warm/{T}", 0, "train", [1] * T) for T in buckets]  # one document per bucket: every shape
    write_corpus(work / "warm", warm_docs, args.max_tokens, tokenizer_sha, label_ids, n_shards=1)

    shape = SHAPE_NAMES[args.model_shape]
    lm = emojax.load_model(f"random:{shape}", dtype=args.dtype)
    L = lm.config.n_layers
    layer = args.layer if args.layer is not None else max(1, round(2 * L / 3))
    n_tokens = sum(len(d[3]) for d in docs)
    log(f"bench_dump: {shape} ({lm.num_params / 1e6:.1f}M params, {args.dtype}), layer {layer} of {L}, "
        f"{len(docs)} docs, {n_tokens:,} tokens, device {args.device}")

    def emojax_run(capture: int, tag: str) -> dict:
        config = DumpConfig(corpus=str(work / "warm"), model=f"random:{shape}", out=str(work / f"warm-{tag}"),
                            layers=(capture,), model_dtype=args.dtype, tokens_per_batch=args.tokens_per_batch,
                            buckets=buckets)
        t0 = time.perf_counter()
        dump(config, show_progress=False, log=lambda *_: None, lm=lm)
        compile_s = time.perf_counter() - t0
        config = dataclasses.replace(config, corpus=str(work / "corpus"), out=str(work / f"acts-{tag}"))
        with ForeignLoad() as load:
            t0 = time.perf_counter()
            state = dump(config, show_progress=False, log=lambda *_: None, lm=lm)
            seconds = time.perf_counter() - t0
        summary = json.loads((work / f"acts-{tag}" / "summary" / "process-000.json").read_text())
        return {"seconds": seconds, "tokens_per_s": state["n_tokens"] / seconds,
                "mb_per_s": summary["mb_written"] / seconds, "warmup_s": compile_s, "foreign_cores": load.cores,
                "batch_rows": state["fingerprints"]["capture"]["batch_rows"]}

    emx = emojax_run(layer, "layer")

    # transformers: the same weights, the same batches, the same layer copied to host.
    hf_dir = work / "hf"
    lm.save(hf_dir)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = "cuda" if args.device == "gpu" else "cpu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).to(device).eval()
    manifest = read_manifest(str(work / "corpus"))
    shards = [read_shard(str(work / "corpus"), s) for s in manifest["shards"]]
    rows = dict(zip(buckets, emx["batch_rows"]))
    plans = [(shard, plan_batches(shard.lengths, buckets, rows)) for shard in shards]

    def hf_batch(tokens, mask):
        ids = torch.from_numpy(tokens).long().to(device)
        attn = torch.from_numpy(mask).long().to(device)
        with torch.no_grad():
            hidden = hf(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[layer]
            return hidden[attn.bool()].to(torch.bfloat16).float().cpu().numpy()  # bf16 like the store

    for T in buckets:  # warm-up: one batch per bucket
        tokens = np.ones((rows[T], T), np.int32)
        hf_batch(tokens, np.ones_like(tokens))
    copied = 0
    with ForeignLoad() as load:
        t0 = time.perf_counter()
        for shard, batches in plans:
            for batch in batches:
                tokens, mask = batch_arrays(batch, shard.tokens, shard.offsets)
                copied += hf_batch(tokens, mask).nbytes // 2  # counted as bf16 bytes
        if device == "cuda":
            torch.cuda.synchronize()
        hf_s = time.perf_counter() - t0
    hf_fig = {"seconds": hf_s, "tokens_per_s": n_tokens / hf_s, "mb_per_s": copied / 1e6 / hf_s,
              "foreign_cores": load.cores}

    common = {"model_shape": shape, "dtype": args.dtype, "layer": layer, "n_layers": L, "docs": len(docs),
              "tokens": n_tokens, "device": args.device, "tokens_per_batch": args.tokens_per_batch,
              **env_info()}
    emit({"bench": "dump", "what": f"emojax dump of layer {layer} (TensorStore, bf16) vs transformers forward "
                                   "+ output_hidden_states + host copy",
          "emojax_tokens_per_s": emx["tokens_per_s"], "emojax_mb_per_s": emx["mb_per_s"],
          "transformers_tokens_per_s": hf_fig["tokens_per_s"], "transformers_mb_per_s": hf_fig["mb_per_s"],
          "ratio": emx["tokens_per_s"] / hf_fig["tokens_per_s"], "emojax_warmup_s": emx["warmup_s"],
          "emojax_foreign_cores": emx["foreign_cores"], "transformers_foreign_cores": hf_fig["foreign_cores"],
          **common})
    if args.full_depth:
        full = emojax_run(L, "full")
        emit({"bench": "dump_full_depth", "what": f"emojax dump of layer {L} (every layer run) vs the same "
                                                  "transformers loop",
              "emojax_tokens_per_s": full["tokens_per_s"], "emojax_mb_per_s": full["mb_per_s"],
              "transformers_tokens_per_s": hf_fig["tokens_per_s"],
              "ratio": full["tokens_per_s"] / hf_fig["tokens_per_s"], "emojax_foreign_cores": full["foreign_cores"],
              **common})
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
