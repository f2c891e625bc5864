"""Corpus stage throughput: generate + validate + dedupe + tokenize + shard >= 100k documents, on the local
Beam DirectRunner in memory and with 2 worker processes, same config, same process.

    python scripts/bench_corpus.py [--stories-per-topic 6] [--workers 2] [--out /tmp/emojax-bench-corpus]

Prints one JSON line per runner mode with documents/s and tokens/s, and the multi-process/in-memory ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import emit, env_info, log  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stories-per-topic", type=int, default=6, help="6 gives 171 x 100 x 6 = 102,600 stories")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--out", default="/tmp/emojax-bench-corpus")
    args = p.parse_args(argv)

    from emojax.pipelines.corpus import build_corpus
    from emojax.corpus.config import CorpusConfig
    from emojax.corpus.generator import GeneratorConfig

    config = CorpusConfig(generator=GeneratorConfig(stories_per_topic=args.stories_per_topic), n_shards=args.shards)
    modes = {
        "in_memory": ["--direct_running_mode=in_memory"],
        f"multi_processing_{args.workers}": [f"--direct_num_workers={args.workers}",
                                             "--direct_running_mode=multi_processing"],
    }
    results = {}
    for mode, beam_args in modes.items():
        out = os.path.join(args.out, mode)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        manifest = build_corpus(dataclasses.replace(config, out=out), beam_args)
        seconds = time.perf_counter() - t0
        docs, tokens = manifest["documents_written"], manifest["tokens_written"]
        results[mode] = docs / seconds
        log(f"{mode}: {docs:,} documents, {tokens:,} tokens in {seconds:.1f}s")
        emit({"bench": "corpus_build", "mode": mode, "documents": docs, "tokens": tokens, "seconds": seconds,
              "docs_per_s": docs / seconds, "tokens_per_s": tokens / seconds, "cpu_count": env_info()["cpu_count"]})
    base, multi = results["in_memory"], results[f"multi_processing_{args.workers}"]
    emit({"bench": "corpus_build_ratio", "multi_over_in_memory": multi / base})


if __name__ == "__main__":
    main()
