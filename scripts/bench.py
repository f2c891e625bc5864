"""All benchmarks in one run: emojax against its PyTorch baseline for the model forward, the dump, SAE
training and steered decode, each measured side by side in the same process.

    python scripts/bench.py [--device cpu|gpu] [--model-shape tiny|50m|1b] [--only forward,dump,sae,decode]
                            [--out FILE] [--timeout S] [--budget S] [--peak-tflops F]

Each bench runs as a subprocess (scripts/bench_forward.py, bench_dump.py, bench_sae.py, bench_decode.py; each
prints JSON lines), one after the other, in the order of --only. For every figure this prints one JSON line:
`bench`, `figure`, `emojax` and `baseline` (the baseline measured in the same run), `ratio` = emojax / baseline,
`unit`, `device`, `device_kind`, `model_shape`, `shape` (the sizes measured), and `target` / `meets_target`
where DESIGN.md sets one for this device and shape (null elsewhere); SAE lines also carry `emojax_mfu` and
`baseline_mfu` (null unless the device's peak FLOP/s is known). `record` keeps the script's own line.
A bench that fails or times out gets a line with `status` "failed" or "timeout" and an `error` naming it;
the others still run, and the exit status is 1 at the end. Progress and a summary go to stderr.

Shapes: tiny (a smoke run: all four in about 1-2 minutes on 2 cores); 50m (the CPU anchor of DESIGN.md, the
~56M llama-56m preset; all four in under 10 minutes on 2 cores); 1b (the GPU anchor, TinyLlama-1.1B's shape,
sized for scripts/gpu_check.sh; on CPU it runs minimal counts with nothing bounding its time).
SAE sizes follow the shape: tiny d 64 / 512 latents / k 8 / batch 256; 50m d 512 / 4096 / 32 / 1024;
1b d 2048 / 32768 / 32 / 4096.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCHES = ("forward", "dump", "sae", "decode")
SCRIPTS = {name: f"scripts/bench_{name}.py" for name in BENCHES}
MODEL_SHAPES = {"tiny": "tiny", "50m": "56m", "1b": "1b"}  # this flag's names -> the scripts' --model-shape
SAE_SIZES = {"tiny": (64, 512, 8, 256), "50m": (512, 4096, 32, 1024), "1b": (2048, 32768, 32, 4096)}  # d, f, k, B

# Repetitions per shape, chosen for the time each shape is meant to take (see the docstring).
FORWARD_ARGS = {"tiny": ["--batch", "2", "--seq", "32", "--iters", "3", "--rounds", "2"],
                "50m": ["--iters", "3", "--rounds", "3"],  # batch 8 x seq 256, the CPU anchor's
                "1b": {"gpu": ["--iters", "5", "--rounds", "3"],
                       "cpu": ["--batch", "1", "--seq", "64", "--iters", "1", "--rounds", "1"]}}
# The generated documents are all cut to --max-tokens (512 by default): one bucket of that length is the plan
# the default buckets give too, without compiling nine unused ones.
DUMP_ARGS = {"tiny": ["--docs", "16", "--max-tokens", "32", "--buckets", "32"],
             "50m": {"cpu": ["--docs", "60", "--buckets", "512"], "gpu": ["--docs", "1000", "--buckets", "512"]},
             "1b": {"gpu": ["--docs", "500", "--buckets", "512"],
                    "cpu": ["--docs", "8", "--max-tokens", "32", "--buckets", "32"]}}
SAE_ARGS = {"tiny": ["--steps", "5", "--rounds", "2"],
            "50m": {"cpu": ["--steps", "8", "--rounds", "3"], "gpu": ["--steps", "20", "--rounds", "3"]},
            "1b": {"gpu": ["--steps", "20", "--rounds", "3"], "cpu": ["--steps", "1", "--rounds", "1"]}}
DECODE_ARGS = {"tiny": ["--new-tokens", "8", "--rounds", "1"],
               "50m": ["--rounds", "2"],  # 128 new tokens at batch 1 and 32, as DESIGN.md's anchors
               "1b": {"gpu": ["--rounds", "1"],  # transformers takes ~10 s a call at either batch
                      "cpu": ["--new-tokens", "8", "--rounds", "1"]}}
TIMEOUT_S = {"tiny": {"forward": 120, "dump": 150, "sae": 120, "decode": 150},
             "50m": {"forward": 240, "dump": 300, "sae": 180, "decode": 360},
             "1b": {"forward": 300, "dump": 240, "sae": 150, "decode": 240}}
MIN_TIMEOUT_S = 15  # a bench given less of the --budget than this is not started

# Dense bf16 matmul FLOP/s by jax device kind. DESIGN.md's SAE anchor counts MFU against 790 TFLOP/s, the
# bf16 matrix-product rate measured on these H100/H200 machines, so the MFU here is comparable with its 33%.
PEAK_FLOPS = {"H100 80GB HBM3": 790e12, "H100 SXM": 790e12, "H200": 790e12}


def bench_command(name: str, device: str, model_shape: str) -> list[str]:
    """The command line of one bench script for this device and shape (run from the repository root)."""
    def pick(table):
        args = table[model_shape]
        return args[device] if isinstance(args, dict) else args

    cmd = [sys.executable, SCRIPTS[name], "--device", device]
    if name == "sae":
        d, f, k, batch = SAE_SIZES[model_shape]
        return cmd + ["--d", str(d), "--latents", str(f), "--k", str(k), "--batch", str(batch)] + pick(SAE_ARGS)
    table = {"forward": FORWARD_ARGS, "dump": DUMP_ARGS, "decode": DECODE_ARGS}[name]
    return cmd + ["--model-shape", MODEL_SHAPES[model_shape]] + pick(table)


def bench_env(device: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)  # no install needed
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"  # bench_sae.py does not set it itself
    return env


def run_bench(name: str, cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[list[dict], str | None]:
    """Runs one bench script; returns the JSON records it printed (also those printed before a failure) and
    an error message naming the bench, or None. Its stderr goes straight to ours."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        error = None if proc.returncode == 0 else f"{name}: {SCRIPTS[name]} exited with status {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: nothing of it outlives the timeout
        out, _ = proc.communicate()
        error = f"{name}: {SCRIPTS[name]} timed out after {timeout_s:.0f} s"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    records = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "bench" in record:
            records.append(record)
        elif line.strip():
            log(f"  [{name} stdout] {line}")
    if error is None and not records:
        error = f"{name}: {SCRIPTS[name]} printed no figure"
    return records, error


def target_for(bench: str, device: str, model_shape: str, batch: int | None = None) -> dict | None:
    """DESIGN.md's target for this figure: {"metric": "ratio"|"emojax"|"emojax_mfu", "min": x, "text": ...}.
    Targets are set at the anchor shapes only (cpu: 50m, gpu: 1b)."""
    if (device, model_shape) == ("cpu", "50m"):
        minimum = {"forward": 1.0, "dump": 1.0, "sae": 1.0, "decode": 1.5 if batch in (1, 32) else None}[bench]
        metric, text = "ratio", f">= {minimum}x the baseline"
    elif (device, model_shape) == ("gpu", "1b"):
        minimum = {"forward": None, "dump": 220_000, "sae": 0.5,
                   "decode": {1: 700, 32: 15_000}.get(batch)}[bench]
        metric = "emojax_mfu" if bench == "sae" else "emojax"
        text = f">= {minimum:.0%} MFU" if bench == "sae" else f">= {minimum:,} tok/s" if minimum else ""
    else:
        return None
    return None if minimum is None else {"metric": metric, "min": minimum, "text": text}


def device_kind(record: dict) -> str | None:
    return record.get("jax_device") or record.get("env", {}).get("jax_device")


def figure_of(bench: str, record: dict) -> dict:
    """The common fields of one script record: figure, emojax, baseline, shape and the side facts."""
    kind = record["bench"]
    if kind == "forward_capture":
        return {"figure": kind, "emojax": record["emojax_tok_s"], "baseline": record["baseline_tok_s"],
                "baseline_name": "transformers", "dtype": record["dtype"],
                "shape": f"{record['shape']}, batch {record['batch']} x seq {record['seq']}",
                "emojax_compile_s": record["emojax_compile_s"],
                "emojax_foreign_cores": record["emojax_foreign_cores"],
                "baseline_foreign_cores": record["baseline_foreign_cores"]}
    if kind in ("dump", "dump_full_depth"):
        return {"figure": kind, "emojax": record["emojax_tokens_per_s"],
                "baseline": record["transformers_tokens_per_s"], "baseline_name": "transformers",
                "dtype": record["dtype"],
                "shape": f"{record['model_shape']}, layer {record['layer']} of {record['n_layers']}, "
                         f"{record['docs']} docs, {record['tokens']} tokens",
                "emojax_compile_s": record.get("emojax_warmup_s"),
                "emojax_foreign_cores": record["emojax_foreign_cores"],
                "baseline_foreign_cores": record.get("transformers_foreign_cores")}
    if kind == "sae_topk_train":
        return {"figure": kind, "emojax": record["emojax_tokens_per_s"], "baseline": record["torch_tokens_per_s"],
                "baseline_name": "PyTorch TopK SAE", "dtype": "float32",
                "shape": f"d {record['d']}, {record['latents']} latents, k {record['k']}, batch {record['batch']}"}
    if kind == "steered_decode":
        return {"figure": f"{kind} batch {record['batch']}", "emojax": record["emojax_tok_s"],
                "baseline": record["baseline_tok_s"], "baseline_name": "transformers generate + forward hook",
                "dtype": record["dtype"],
                "shape": f"{record['shape']}, batch {record['batch']}, prompt {record['prompt_len']}, "
                         f"{record['new_tokens']} new tokens",
                "emojax_compile_s": record["emojax_compile_s"], "token_agreement": record["token_agreement"],
                "near_tie_divergences": record.get("near_tie_divergences"),
                "diverged_rows": record.get("diverged_rows"),
                "emojax_foreign_cores": record["emojax_foreign_cores"],
                "baseline_foreign_cores": record["baseline_foreign_cores"]}
    raise ValueError(f"{bench}: unknown record kind {kind!r}")


def figure_line(bench: str, record: dict, device: str, model_shape: str, peak_flops: float | None) -> dict:
    """One output line for one script record."""
    fig = figure_of(bench, record)
    line = {"bench": bench, "status": "ok", "figure": fig.pop("figure"), "emojax": fig.pop("emojax"),
            "baseline": fig.pop("baseline")}
    line["ratio"] = line["emojax"] / line["baseline"]
    line.update(unit="tok/s", device=device, device_kind=device_kind(record), model_shape=model_shape, **fig)
    if bench == "sae":
        # dense count (as DESIGN.md's anchor): encoder and decoder matmuls, 2*d*f FLOPs each, x3 for fwd + bwd
        flops_per_token = 12 * record["d"] * record["latents"]
        peak = peak_flops or (None if device == "cpu" else
                              next((v for k, v in PEAK_FLOPS.items() if k in (line["device_kind"] or "")), None))
        line["peak_flops"] = peak
        line["emojax_mfu"] = line["emojax"] * flops_per_token / peak if peak else None
        line["baseline_mfu"] = line["baseline"] * flops_per_token / peak if peak else None
    target = target_for(bench, device, model_shape, record.get("batch") if bench == "decode" else None)
    line["target"] = target["text"] if target else None
    value = None if target is None else line.get(target["metric"])
    line["meets_target"] = None if value is None else bool(value >= target["min"])
    line["script"] = SCRIPTS[bench]
    line["record"] = record
    return line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--model-shape", choices=list(MODEL_SHAPES), default="50m")
    p.add_argument("--only", default=",".join(BENCHES),
                   help="comma-separated benches, run in this order (default: forward,dump,sae,decode)")
    p.add_argument("--out", help="also write the JSON lines to this file")
    p.add_argument("--timeout", type=float, help="seconds per bench (default: per bench and shape)")
    p.add_argument("--budget", type=float, help="seconds for all benches together; a bench gets at most what "
                                                "is left, and none starts with under 15 s")
    p.add_argument("--peak-tflops", type=float, help="the device's peak FLOP/s for the SAE MFU, in TFLOP/s "
                                                     "(default: known for H100 SXM and H200 only)")
    args = p.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in args.only if b not in BENCHES]
    if unknown or not args.only:
        p.error(f"--only: unknown bench {', '.join(unknown) or '(none given)'}; choose from {', '.join(BENCHES)}")
    return args


def bench_lines(name: str, args: argparse.Namespace, env: dict[str, str], left_s: float | None) -> list[dict]:
    """Runs one bench; returns its output lines: one per figure, then one with status "failed" or "timeout"
    and the error if it did not succeed. `left_s`: what is left of --budget (None: no budget)."""
    cmd = bench_command(name, args.device, args.model_shape)
    timeout_s = args.timeout or TIMEOUT_S[args.model_shape][name]
    if left_s is not None and left_s < MIN_TIMEOUT_S:
        records, error = [], f"{name}: {SCRIPTS[name]} not started, the --budget of {args.budget:.0f} s is spent"
    else:
        timeout_s = timeout_s if left_s is None else min(timeout_s, left_s)
        log(f"bench.py: {name} (timeout {timeout_s:.0f} s): {' '.join(cmd[1:])}")
        t0 = time.monotonic()
        records, error = run_bench(name, cmd, env, timeout_s)
        log(f"bench.py: {name} ran {time.monotonic() - t0:.0f} s")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    lines = []
    for record in records:
        try:
            lines.append(figure_line(name, record, args.device, args.model_shape, peak))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            error = error or f"{name}: unreadable figure from {SCRIPTS[name]} ({type(e).__name__}: {e})"
    if error:
        log(f"bench.py: FAILED {error}")
        lines.append({"bench": name, "status": "timeout" if "timed out" in error else "failed", "error": error,
                      "device": args.device, "model_shape": args.model_shape, "script": SCRIPTS[name]})
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    env = bench_env(args.device)
    start = time.monotonic()
    lines = []
    with open(args.out, "w") if args.out else contextlib.nullcontext() as out:
        for name in args.only:
            left_s = None if args.budget is None else args.budget - (time.monotonic() - start)
            for line in bench_lines(name, args, env, left_s):
                text = json.dumps(line)
                print(text, flush=True)
                if out:
                    out.write(text + "\n")
                    out.flush()  # what finished survives a kill of this process
                lines.append(line)
    log_summary(lines, time.monotonic() - start)
    return 0 if all(line["status"] == "ok" for line in lines) else 1


def log_summary(lines: list[dict], seconds: float) -> None:
    figures = [line for line in lines if line["status"] == "ok"]
    log(f"\nbench.py: {len(figures)} figures in {seconds:.0f} s")
    for line in figures:
        mfu = f", MFU {line['emojax_mfu']:.1%}" if line.get("emojax_mfu") is not None else ""
        target = f"  target {line['target']}: {'met' if line['meets_target'] else 'NOT met'}" if line["target"] \
            else ""
        log(f"  {line['figure']:<24} emojax {line['emojax']:>12,.0f}  baseline {line['baseline']:>12,.0f} "
            f"{line['unit']}  ratio {line['ratio']:6.2f}x{mfu}{target}")
    for line in lines:
        if line["status"] != "ok":
            log(f"  FAILED {line['error']}")


if __name__ == "__main__":
    raise SystemExit(main())
