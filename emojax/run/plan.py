"""`emojax plan --config FILE [SECTION.KEY=VALUE ...]`: the resolved job, before anything heavy runs.

Prints the model (family, parameters, dtype), the dump's mesh and per-device memory, the corpus size, the
store's size on disk, the SAE's memory, and an estimated time per stage for a device kind; warns, naming the
key to change, where a setting cannot fit. Nothing is trained, generated, loaded or written: shapes are
abstract (plan_model.py), corpus sizes arithmetic plus a small tokenized sample (plan_corpus.py), times scaled
from measured benchmark figures (plan_time.py, device_kinds.py). The stage configs are built by the same
stage adapters `emojax run` uses, so the plan is of the job the run would do.

Store size on disk per captured layer (uncompressed): tokens x d_model x bytes(dump.dtype) for the token
activations plus documents x d_model x 4 for the float32 pooled means; the token ids add tokens x 4 once.
SAE memory per device, on sae.mesh = [data, tensor], with F = n_latents / tensor and S = the SAEs of a sweep:
parameters S x (2 x d x F + F + d [+ F thresholds for jumprelu]) x 4 bytes, gradients the same, Adam moments
twice that, and a working set S x (3 x B x F + 4 x B x d) x 4 for B = batch_size / data tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from emojax.errors import ConfigError
from emojax.run import stages
from emojax.run.config import load_run_file
from emojax.run.device_kinds import DeviceKind, device_kind
from emojax.run.plan_corpus import corpus_size
from emojax.run.plan_model import DTYPE_BYTES, dump_activation_bytes, parameter_layout, resolve_model
from emojax.run.plan_time import stage_times


def plan_job(config_file: str | Path, overrides=(), device: str = "cpu", model_shape: str | None = None,
             hosts: int = 1) -> dict:
    """The plan as a JSON-able dict: sections model, dump, corpus, store, sae, time, warnings, notes.

    device: a device kind of device_kinds.DEVICE_KINDS; model_shape: a preset whose shape replaces run.model's
    (for a checkpoint folder that is not on this machine); hosts: processes running the dump together.
    """
    from emojax.store.batches import rows_per_bucket
    from emojax.store.config import default_buckets, default_layers

    run_file = load_run_file(config_file, overrides)
    kind = device_kind(device)
    if hosts < 1:
        raise ConfigError(f"--hosts {hosts}: must be at least 1")
    ctx = stages.Context(run_file=run_file, run_dir=Path(run_file.run.dir), show_progress=False)
    train = stages.STAGES["train"]._config(ctx)
    model = resolve_model(run_file, config_file, model_shape, train)
    if train is not None and model.tokenizer:  # the cached built-in model: its tokenizer, as the run would use
        ctx.results["train"] = {"path": model.tokenizer}
    corpus, dump, sae, steer = (stages.STAGES[name]._config(ctx) for name in ("corpus", "dump", "sae", "steer"))
    stages.STAGES["fit"]._config(ctx)  # typed too, so a bad fit key fails here as it would in the run
    cfg = model.config
    notes = [*model.notes, "times scale measured throughput by FLOPs: compilation, start-up and I/O are not counted"]

    mesh = tuple(dump.mesh) or (kind.devices_per_host, 1, 1)
    if not dump.mesh:
        notes.append(f"dump.mesh is empty: all {kind.devices_per_host} device(s) of a {kind.name} host on data")
    layers = tuple(dump.layers) or default_layers(cfg.n_layers)
    T = max(dump.buckets or default_buckets(corpus.max_tokens))
    rows = rows_per_bucket((T,), dump.tokens_per_batch, mesh[0] * mesh[1])[T]
    layout = parameter_layout(cfg, mesh)
    act = dump_activation_bytes(cfg, mesh, rows, T, len(layers), dump.dtype, dump.model_dtype)
    param_dev = layout["per_device"] * DTYPE_BYTES[dump.model_dtype]
    docs = corpus_size(corpus, model.tokenizer)
    per_layer_tokens = docs["tokens"] * cfg.d_model * DTYPE_BYTES[dump.dtype]
    per_layer_pooled = docs["documents"] * cfg.d_model * 4
    sae_mem = sae_memory(sae, cfg.d_model)
    concepts = set(corpus.generator.concepts) if not corpus.inputs and corpus.generator.concepts else None
    steer_concepts = len([c for c in steer.concepts if concepts is None or c in concepts]) or 4
    plan = {
        "config": run_file.source, "run_dir": run_file.run.dir, "stages": list(run_file.run.stages),
        "device": {"kind": kind.name, "about": kind.about, "memory_bytes": kind.memory_bytes,
                   "devices_per_host": kind.devices_per_host},
        "model": {"run_model": run_file.run.model, "shape_from": model.shape_from, "family": cfg.architecture,
                  "parameters": layout["total"], "dtype": dump.model_dtype, "d_model": cfg.d_model,
                  "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
                  "max_positions": cfg.max_position_embeddings, "tokenizer": model.tokenizer or "not here"},
        "dump": {"mesh": list(mesh), "devices": math.prod(mesh), "layers": list(layers), "store_dtype": dump.dtype,
                 "tokens_per_batch": dump.tokens_per_batch, "largest_bucket": T, "batch_rows": rows,
                 "parameter_bytes_per_device": param_dev, "activation_bytes_per_device": act["total"],
                 "activation_parts": {k: act[k] for k in ("captured", "residual", "attention", "mlp")},
                 "total_bytes_per_device": param_dev + act["total"],
                 "how": "parameters: abstract shapes on the sharding table; activations: estimate, one batch of "
                        "the largest bucket (formula in emojax/run/plan_model.py)"},
        "corpus": docs,
        "store": {"dtype": dump.dtype, "layers": list(layers), "token_bytes_per_layer": per_layer_tokens,
                  "pooled_bytes_per_layer": per_layer_pooled, "bytes_per_layer": per_layer_tokens + per_layer_pooled,
                  "token_id_bytes": docs["tokens"] * 4,
                  "total_bytes": (per_layer_tokens + per_layer_pooled) * len(layers) + docs["tokens"] * 4,
                  "how": "tokens x d_model x bytes(dtype) + documents x d_model x 4 per layer, uncompressed; "
                         "tokens are the corpus estimate"},
        "sae": sae_mem,
        "time": stage_times(run_file.run.stages, kind, cfg, tokens=docs["tokens"], dump_depth=max(layers), sae=sae,
                            steer=steer, steer_concepts=steer_concepts, train=train,
                            trained=train is not None and model.tokenizer is not None,
                            dump_devices=math.prod(mesh), hosts=hosts),
        "notes": notes,
    }
    plan["warnings"] = plan_warnings(plan, kind, sae, corpus.max_tokens, run_file.run.layer)
    return plan


def sae_memory(sae, d: int) -> dict:
    """Per-device SAE training memory on sae.mesh (the formula in the module docstring)."""
    data, tensor = sae.mesh
    F, B, S = sae.n_latents // tensor, sae.batch_size // data, sae.n_sae
    thresholds = F if sae.variant == "jumprelu" else 0
    params = S * (2 * d * F + F + d + thresholds) * 4
    parts = {"parameter_bytes_per_device": params, "gradient_bytes_per_device": params,
             "optimizer_bytes_per_device": 2 * params, "statistics_bytes_per_device": S * F * 4,
             "working_bytes_per_device": S * (3 * B * F + 4 * B * d) * 4}
    return {"n_sae": S, "n_latents": sae.n_latents, "d": d, "mesh": list(sae.mesh), "variant": sae.variant,
            "parameters_per_sae": 2 * d * sae.n_latents + sae.n_latents + d + (thresholds * tensor),
            **parts, "total_bytes_per_device": sum(parts.values())}


def plan_warnings(plan: dict, kind: DeviceKind, sae, max_tokens: int, run_layer: int) -> list[dict]:
    """Settings that cannot work on `kind`, each naming the key to change."""
    warn = []
    mem, dump, model = kind.memory_bytes, plan["dump"], plan["model"]
    where = f"one {kind.name} device has {gib(mem)}"
    for section, devices in (("dump", dump["devices"]), ("sae", math.prod(plan["sae"]["mesh"]))):
        if devices > kind.devices_per_host:
            warn.append({"key": f"{section}.mesh", "message": f"{section}.mesh={plan[section]['mesh']} needs "
                         f"{devices} devices in one process; one {kind.name} host has {kind.devices_per_host}"})
    if dump["parameter_bytes_per_device"] > mem:
        halve = f" or load them in bfloat16 (dump.model_dtype={model['dtype']})" if model["dtype"] == "float32" else ""
        need = gib(dump["parameter_bytes_per_device"])
        warn.append({"key": "dump.mesh", "message": f"the parameters alone need {need} per device; {where}: shard "
                     f"them over more devices (dump.mesh fsdp/tensor, now {dump['mesh']}){halve}"})
    elif dump["total_bytes_per_device"] > mem:
        spare = mem - dump["parameter_bytes_per_device"]
        fits = 2 ** int(math.log2(max(1.0, dump["tokens_per_batch"] * spare / dump["activation_bytes_per_device"])))
        warn.append({"key": "dump.tokens_per_batch", "message": f"parameters + one batch need "
                     f"{gib(dump['total_bytes_per_device'])} per device; {where}: lower dump.tokens_per_batch "
                     f"(now {dump['tokens_per_batch']}; ~{fits} would fit) or shard over more devices (dump.mesh)"})
    s = plan["sae"]
    state = s["total_bytes_per_device"] - s["working_bytes_per_device"]
    if state > mem:
        warn.append({"key": "sae.mesh", "message": f"the SAE state (parameters, gradients, Adam) needs {gib(state)} "
                     f"per device; {where}: split the latents over more devices (sae.mesh tensor, now {s['mesh']}) "
                     f"or train fewer (sae.n_latents={s['n_latents']})"})
    elif s["total_bytes_per_device"] > mem:
        warn.append({"key": "sae.batch_size", "message": f"the SAE step needs {gib(s['total_bytes_per_device'])} per "
                     f"device; {where}: lower sae.batch_size or spread it (sae.mesh data, now {s['mesh']})"})
    if max_tokens > model["max_positions"]:
        warn.append({"key": "corpus.max_tokens", "message": f"corpus.max_tokens={max_tokens} is longer than the "
                     f"model's {model['max_positions']} positions: lower it"})
    too_deep = [i for i in dump["layers"] if i > model["n_layers"]]
    if too_deep:
        warn.append({"key": "dump.layers", "message": f"dump.layers {too_deep} are past the model's last residual "
                     f"index {model['n_layers']}"})
    if sae.layer not in dump["layers"]:
        warn.append({"key": "sae.layer", "message": f"sae.layer={sae.layer} is not captured by the dump (dump.layers="
                     f"{dump['layers']})"})
    if run_layer > model["n_layers"]:
        warn.append({"key": "run.layer", "message": f"run.layer={run_layer} is past the model's last residual "
                     f"index {model['n_layers']}"})
    return warn


def gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.3g} s"


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def format_plan(plan: dict) -> str:
    """The plan as text for a terminal."""
    m, d, c, st, s = plan["model"], plan["dump"], plan["corpus"], plan["store"], plan["sae"]
    dev = plan["device"]
    lines = [f"plan of {plan['config']} (run.dir {plan['run_dir']}), for {dev['kind']}: {dev['about']}", ""]

    def section(title, rows):
        lines.append(title)
        width = max(len(k) for k, _ in rows)
        lines.extend(f"  {k:<{width}}  {v}" for k, v in rows)
        lines.append("")

    section("model", [("run.model", m["run_model"]), ("shape from", m["shape_from"]), ("family", m["family"]),
                      ("parameters", _count(m["parameters"])), ("dtype", m["dtype"]),
                      ("d_model x layers", f"{m['d_model']} x {m['n_layers']}"), ("tokenizer", m["tokenizer"])])
    section("dump", [("mesh [data, fsdp, tensor]", f"{d['mesh']} ({d['devices']} device(s))"),
                     ("layers", d["layers"]), ("batch", f"{d['batch_rows']} rows x {d['largest_bucket']} tokens "
                                                        f"(tokens_per_batch {d['tokens_per_batch']})"),
                     ("parameters / device", gib(d["parameter_bytes_per_device"])),
                     ("activations / device", gib(d["activation_bytes_per_device"]) + " (estimate)"),
                     ("total / device", f"{gib(d['total_bytes_per_device'])} of {gib(dev['memory_bytes'])}")])
    section("corpus", [("documents", _count(c["documents"])), ("tokens", f"{_count(c['tokens'])} (estimate)"),
                       ("how", c["how"])])
    section("store", [("per layer", f"{gib(st['bytes_per_layer'])} ({st['dtype']} tokens + float32 pooled)"),
                      ("total", f"{gib(st['total_bytes'])} for {len(st['layers'])} layer(s), uncompressed")])
    section("sae", [("SAEs x latents x d", f"{s['n_sae']} x {s['n_latents']:,} x {s['d']} ({s['variant']})"),
                    ("mesh [data, tensor]", s["mesh"]),
                    ("parameters / device", gib(s["parameter_bytes_per_device"])),
                    ("gradients + Adam / device", gib(s["gradient_bytes_per_device"]
                                                      + s["optimizer_bytes_per_device"])),
                    ("working set / device", gib(s["working_bytes_per_device"]) + " (estimate)"),
                    ("total / device", f"{gib(s['total_bytes_per_device'])} of {gib(dev['memory_bytes'])}")])
    section("time per stage", [(name, t["label"] if t["seconds"] is None else f"{duration(t['seconds'])}  "
                                f"{t['label']}") for name, t in plan["time"].items()])
    lines.extend(f"note: {n}" for n in plan["notes"])
    lines.extend(f"WARNING {w['key']}: {w['message']}" for w in plan["warnings"])
    return "\n".join(lines).rstrip() + "\n"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from emojax.run.device_kinds import DEVICE_KINDS

    p = subparsers.add_parser(
        "plan", help="show the resolved job (model, memory per device, corpus, store, SAE, time) before running it",
        description="Resolves a run config as `emojax run` would and prints what the job needs, without training, "
                    "generating or loading anything: sizes from abstract shapes, times estimated from the "
                    "benchmark figures of PERFORMANCE.md. Warns, naming the key, where a setting cannot fit.",
    )
    p.add_argument("--config", required=True, help="YAML run config (configs/llama-3.1-8b-gpu.yaml, ...)")
    p.add_argument("--device", default="cpu", help=f"device kind: {', '.join(DEVICE_KINDS)} (default cpu)")
    p.add_argument("--model-shape", help="a preset shape for run.model when its folder is not on this machine")
    p.add_argument("--hosts", type=int, default=1, help="processes running the dump together (default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE, e.g. dump.mesh=[1,1,8] sae.n_latents=16384")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    plan = plan_job(args.config, args.overrides, device=args.device, model_shape=args.model_shape,
                    hosts=args.hosts)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan), end="\n" if args.json else "")
    return 0


__all__ = ["cmd_plan", "format_plan", "plan_job", "register", "sae_memory"]
