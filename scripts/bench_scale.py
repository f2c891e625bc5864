"""Scale: dump, fit and one SAE epoch on stores of growing size; wall time and peak RSS per stage and size.

    python scripts/bench_scale.py [--sizes 2e6,10e6,30e6] [--model random:tiny] [--out DIR]
                                  [--shard-tokens 1e6] [--keep] [--report-only]

For each size (tokens) the script writes a run config (run.dir = OUT/SIZE) and runs `emojax corpus build`,
`emojax dump`, `emojax fit` and `emojax sae` on it, each stage as its own process: its wall time and its peak
RSS (os.wait4's ru_maxrss: the process and the children it waited for) are the stage's own. The corpus is the
built-in story generator (six concepts, byte tokens, max_tokens 512), its stories per topic chosen to reach the
size; corpus shards of about --shard-tokens tokens each, since the dump holds one corpus shard (and reads the
next) at a time. Dump: one layer (about 2/3 of the depth), bf16. Fit: the study's recipe with the probe held to
a fixed number of epochs (no early stop), so every size does the same work per token. SAE: TopK, 8x latents,
one epoch of the train split (its tokens // batch_size steps), no checkpoints until the end.

Output: one JSON line per (size, stage) on stdout; a table, the buffers each stage is designed to hold at most
and the verdicts on stderr; scale.png (seconds per million tokens and peak RSS against size) and
results.jsonl in --out. The corpus stage is reported, not judged (it is not one of the issue's stages).
Verdicts: peak RSS is bounded when the largest size's exceeds the smallest's by at most the stage's designed
buffers (fixed sizes, whatever the store's size: the most a stage holds once its buffers are full) plus 64 MiB,
and the two largest sizes' by at most 64 MiB (the buffers are full by then: what still grows is not bounded);
time is linear when the marginal seconds per token (the added seconds over the added tokens between consecutive
sizes: the fixed start-up cost cancels) stay within 20% of each other, sublinear when they fall by more (fixed
costs dominate) and superlinear when they rise by more. The raw seconds per token are reported too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ForeignLoad, emit, env_info, log  # noqa: E402

CONCEPTS = ("desperate", "calm", "afraid", "joyful", "angry", "proud")
MAX_TOKENS = 512
STAGES = ("corpus", "dump", "fit", "sae")
JUDGED = ("dump", "fit", "sae")
FLAT_RSS_MIB = 64  # allowed peak-RSS growth from the smallest size to the largest, beyond the designed buffers
LINEAR_SPREAD = 0.20  # allowed (max - min) / min of seconds per token across sizes
SAE_BATCH, SAE_EXPANSION, SAE_K = 4096, 8, 16
PROBE_EPOCHS = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2e6,10e6,30e6", help="store sizes in tokens, comma-separated")
    p.add_argument("--model", default="random:tiny", help="random:SHAPE or a SHAPE name of emojax.models.presets")
    p.add_argument("--out", default="/tmp/emojax-bench-scale")
    p.add_argument("--shard-tokens", type=float, default=1e6, help="tokens per corpus shard (the dump's unit)")
    p.add_argument("--keep", action="store_true", help="keep each size's run folder (default: delete it after)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: the table, verdicts and plot again from OUT/results.jsonl")
    args = p.parse_args(argv)
    args.sizes = sorted(int(float(s)) for s in args.sizes.split(","))
    args.model = args.model if ":" in args.model else f"random:{args.model}"
    if not args.model.startswith("random:"):
        p.error(f"--model {args.model!r}: only random-init presets (random:SHAPE) are benchmarked")
    return args


def story_tokens() -> float:
    """Mean tokens of a generated story (byte tokens, BOS included, cut at MAX_TOKENS), from 2 topics' stories."""
    from emojax.corpus.generator import GeneratorConfig, generate
    from emojax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    docs = generate(GeneratorConfig(concepts=CONCEPTS, n_topics=2, stories_per_topic=2, neutral_per_topic=0,
                                    implicit=False))
    return float(np.mean([min(len(tok.encode(d.text)), MAX_TOKENS) for d in docs]))


def run_config(size: int, run_dir: Path, model: str, d_model: int, layer: int, per_story: float,
               shard_tokens: float) -> dict:
    """The run config of one size: the generator's topics and stories per topic reach about `size` tokens."""
    stories = size / per_story
    n_topics = int(min(100, max(10, math.ceil(stories / len(CONCEPTS)))))  # >= 10: val and test get a topic each
    per_topic = max(1, round(stories / (len(CONCEPTS) * n_topics)))
    return {
        "run": {"dir": str(run_dir), "model": model},
        "corpus": {"generator": {"concepts": list(CONCEPTS), "n_topics": n_topics, "stories_per_topic": per_topic},
                   "max_tokens": MAX_TOKENS, "n_shards": max(2, math.ceil(size / shard_tokens))},
        "dump": {"layers": [layer], "dtype": "bfloat16", "mesh": [1, 1, 1]},
        "fit": {"probe_epochs": PROBE_EPOCHS, "probe_patience": PROBE_EPOCHS, "kmeans_k": 4, "mesh": [1, 1, 1]},
        "sae": {"layer": layer, "n_latents": SAE_EXPANSION * d_model, "k": SAE_K, "batch_size": SAE_BATCH,
                "lr": 1e-3, "checkpoint_every": 0, "log_every": 1000},
    }


def train_tokens(corpus: Path) -> int:
    """Tokens the SAE loader draws from: the train split's, each document's first token (the BOS) left out."""
    total = 0
    for shard in sorted((corpus / "shards").glob("*.parquet")):
        table = pq.read_table(shard, columns=["split", "n_tokens"]).to_pydict()
        total += sum(n - 1 for s, n in zip(table["split"], table["n_tokens"]) if s == "train" and n > 1)
    return total


def run_stage(argv: list[str], log_path: Path) -> dict:
    """Runs one stage process; its wall seconds, peak RSS (MiB), CPU seconds and the cores other processes kept
    busy meanwhile."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(log_path, "w") as out, ForeignLoad() as load:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if code:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{' '.join(argv)} exited with {code} (log {log_path}):\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime  # the stage's own CPU seconds, which ForeignLoad counts as foreign
    foreign = None if load.cores is None else max(0.0, load.cores - cpu / seconds)
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": cpu, "foreign_cores": foreign}


def designed_buffers(d_model: int, shard_tokens: float) -> dict[str, dict]:
    """The most activation data each stage is designed to hold at once (MiB), from the settings it runs with;
    the rest of its RSS is the runtime, the model and per-document tables (a few bytes per document)."""
    from emojax.concepts.baselines import MAX_DOCS, N_FEATURES
    from emojax.concepts.config import FitConfig
    from emojax.sae.config import SaeConfig
    from emojax.store.config import DumpConfig

    mib = 2 ** 20
    dump, fit, sae = DumpConfig(), FitConfig(), SaeConfig()
    store_bytes = 2  # bf16 token rows
    write = (dump.writes_in_flight + 1) * dump.token_chunk_rows * d_model * store_bytes
    batches = 2 * dump.tokens_per_batch * d_model * 4  # the batch computing and the one being collected
    shard = 3 * shard_tokens * 4  # int32 tokens of the shard, the next one (read ahead) and its token_ids
    group = sae.buffer_chunks * dump.token_read_rows * d_model * 4
    return {
        "dump": {"mib": (write + batches + shard) / mib,
                 "what": f"writes in flight ({dump.writes_in_flight} + 1 open) x token_chunk_rows "
                         f"{dump.token_chunk_rows} x D x 2 B + 2 batches x tokens_per_batch {dump.tokens_per_batch} "
                         f"x D x 4 B + 3 x shard tokens x 4 B (shard, read-ahead, token_ids)"},
        "fit": {"mib": ((fit.chunk_docs + fit.norm_tokens) * d_model + 2 * max(MAX_DOCS, fit.chunk_docs) * N_FEATURES)
                       * 4 / mib,
                "what": f"chunk_docs {fit.chunk_docs} rows + norm_tokens {fit.norm_tokens} rows, x D x 4 B; the "
                        f"bag-of-tokens baseline's counts, 2 x max({MAX_DOCS} docs, chunk_docs) x {N_FEATURES} x 4 B"},
        "sae": {"mib": 3 * group / mib,
                "what": f"3 x buffer_chunks {sae.buffer_chunks} x token_read_rows {dump.token_read_rows} x D x 4 B "
                        "(the group, its shuffled copy, the next group read ahead)"},
    }


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / min(values) if len(values) > 1 and min(values) > 0 else float("nan")


def verdicts(records: list[dict], buffers: dict[str, dict]) -> dict[str, dict]:
    """Per judged stage: RSS growth (MiB) smallest -> largest size against the stage's designed buffers, raw and
    marginal seconds-per-token spreads, and the time verdict: linear (marginal seconds per token within
    LINEAR_SPREAD), sublinear (they fall by more, never rising past it: fixed costs dominate) or superlinear."""
    out = {}
    for stage in JUDGED:
        rows = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["tokens"])
        raw = [r["s_per_mtok"] for r in rows]
        marginal = [(b["seconds"] - a["seconds"]) / (b["tokens"] - a["tokens"]) * 1e6 for a, b in zip(rows, rows[1:])]
        growth = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
        last = rows[-1]["peak_rss_mib"] - rows[-2]["peak_rss_mib"] if len(rows) > 1 else 0.0
        if len(marginal) < 2 or spread(marginal) <= LINEAR_SPREAD:
            time = "linear"
        elif all(b <= a * (1 + LINEAR_SPREAD) for a, b in zip(marginal, marginal[1:])):
            time = "sublinear"
        else:
            time = "superlinear"
        bound = buffers[stage]["mib"] + FLAT_RSS_MIB
        out[stage] = {"rss_growth_mib": growth, "rss_growth_last_mib": last, "rss_bound_mib": bound,
                      "rss_bounded": growth <= bound and last <= FLAT_RSS_MIB, "raw_spread": spread(raw),
                      "marginal_s_per_mtok": marginal, "marginal_spread": spread(marginal), "time": time}
    return out


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        rows = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["tokens"])
        x = [r["store_tokens"] / 1e6 for r in rows]
        ax_t.plot(x, [r["s_per_mtok"] for r in rows], "o-", label=stage)
        ax_m.plot(x, [r["peak_rss_mib"] for r in rows], "o-", label=stage)
    sizes = sorted({r["store_tokens"] / 1e6 for r in records})
    for ax, ylabel in ((ax_t, "seconds per million tokens"), (ax_m, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{v:.3g}" for v in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("store size (million tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("emojax stages against store size (each stage its own process)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    from emojax.models.presets import SHAPES
    from emojax.progress import progress_bar

    shape = SHAPES[args.model.split(":", 1)[1]]
    layer = max(1, round(2 * shape.n_layers / 3))
    out = Path(args.out)
    if args.report_only:
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        buffers = designed_buffers(records[0]["d_model"], records[0].get("shard_tokens", args.shard_tokens))
        plot(records, out / "scale.png")
        report(records, buffers, verdicts(records, buffers), out)
        return
    out.mkdir(parents=True, exist_ok=True)
    emojax_cli = str(Path(sys.executable).parent / "emojax")
    per_story = story_tokens()
    common = {"model": args.model, "layer": layer, "d_model": shape.d_model, "shard_tokens": args.shard_tokens,
              **env_info()}  # jax: via emojax
    log(f"bench_scale: {args.model}, layer {layer}, sizes {args.sizes}, {per_story:.0f} tokens per story")
    records = []
    with progress_bar("scale", len(args.sizes) * len(STAGES)) as update:
        for size in args.sizes:
            run_dir = out / f"size-{size}"
            shutil.rmtree(run_dir, ignore_errors=True)
            (run_dir / "logs").mkdir(parents=True)
            config = run_config(size, run_dir, args.model, shape.d_model, layer, per_story, args.shard_tokens)
            config_path = run_dir / "config.yaml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            tokens, steps = 0, 0
            for stage in STAGES:
                update(description=f"{size:,} tokens: {stage}")
                if stage == "sae":
                    steps = train_tokens(run_dir / "corpus") // SAE_BATCH
                    command = [emojax_cli, "sae", "--config", str(config_path), "--quiet", f"steps={steps}",
                               f"lr_warmup_steps={min(100, steps // 10)}"]
                else:
                    command = [emojax_cli, *(("corpus", "build") if stage == "corpus" else (stage,)),
                               "--config", str(config_path)]
                    command += ["--quiet"] if stage in ("dump", "fit") else []
                figures = run_stage(command, run_dir / "logs" / f"{stage}.log")
                if stage == "corpus":
                    tokens = json.loads((run_dir / "corpus" / "manifest.json").read_text())["tokens_written"]
                stage_tokens = steps * SAE_BATCH if stage == "sae" else tokens
                record = {"bench": "scale", "size": size, "stage": stage, "tokens": stage_tokens,
                          "store_tokens": tokens, **figures, "tokens_per_s": stage_tokens / figures["seconds"],
                          "s_per_mtok": figures["seconds"] / stage_tokens * 1e6,
                          "n_shards": config["corpus"]["n_shards"], **({"sae_steps": steps} if steps else {}),
                          **common}
                emit(record)
                records.append(record)
                update(advance=1)
            if not args.keep:
                for folder in ("corpus", "activations", "concepts", "sae"):
                    shutil.rmtree(run_dir / folder, ignore_errors=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot(records, out / "scale.png")
    buffers = designed_buffers(shape.d_model, args.shard_tokens)
    report(records, buffers, verdicts(records, buffers), out)


def report(records: list[dict], buffers: dict, judged: dict, out: Path) -> None:
    log("| size (tokens) | stage | tokens | seconds | tokens/s | s per M tokens | peak RSS (MiB) |")
    log("|---|---|---|---|---|---|---|")
    for r in records:
        log(f"| {r['size']:,} | {r['stage']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['s_per_mtok']:.2f} | {r['peak_rss_mib']:.0f} |")
    for stage in JUDGED:
        v = judged[stage]
        marginal = ", ".join(f"{m:.2f}" for m in v["marginal_s_per_mtok"])
        log(f"{stage}: designed buffers {buffers[stage]['mib']:.1f} MiB ({buffers[stage]['what']}); peak RSS "
            f"{v['rss_growth_mib']:+.0f} MiB smallest -> largest ({v['rss_growth_last_mib']:+.0f} between the two "
            "largest), "
            f"{'within' if v['rss_bounded'] else 'PAST'} the bound {v['rss_bound_mib']:.0f} MiB (buffers + "
            f"{FLAT_RSS_MIB} MiB); s per M tokens spread {v['raw_spread']:.0%} raw, marginal [{marginal}] spread "
            f"{v['marginal_spread']:.0%}: {v['time'] if v['time'] != 'superlinear' else 'SUPERLINEAR'}")
        emit({"bench": "scale_verdict", "stage": stage, "designed_buffers_mib": buffers[stage]["mib"], **{
            k: v[k] for k in ("rss_growth_mib", "rss_growth_last_mib", "rss_bound_mib", "rss_bounded", "raw_spread",
                              "marginal_spread", "time")}})
    log(f"plot: {out / 'scale.png'}; records: {out / 'results.jsonl'}")


if __name__ == "__main__":
    main()
