"""Reading a run directory's artefacts for the report. Every reader returns None (or an empty list) when its
inputs are absent, so the report can show that stage as "not run"; unreadable files raise ReportError naming
the file.

    run_dir/corpus/manifest.json                 corpus counts (pipelines/corpus.py write_manifest)
    run_dir/activations/store.json               the activation store (emojax/store/dumper.py)
    run_dir/activations/summary/process-*.json   dump throughput per process
    run_dir/concepts/bank.json, bank.safetensors, eval.json   the fit stage (emojax/concepts/fit.py)
    run_dir/sae/*/metrics.json                   one SAE's metrics (an object) or a sweep's (a list)
    run_dir/validate/top_tokens.json, templates.json   top-activating tokens and numeric templates
    run_dir/steer/curves.json, monitor.json      steering curves and a monitored generation
    run_dir/stages/*.json                        {"stage", "seconds", "skipped", "summary"} per stage
    run_dir/screen/manifest.json, scores.parquet data screening (emojax/screen/run.py)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from emojax.concepts.layer import choose_layer
from emojax.errors import EmojaxError
from emojax.screen.score import column

SAE_REQUIRED = ("name", "l0", "fvu", "dead_fraction")


class ReportError(EmojaxError):
    """A run-directory artefact that exists but cannot be read as the report expects."""


def read_json(path: Path):
    """The parsed JSON at `path`, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ReportError(f"{path}: unreadable JSON ({e})") from None


def corpus_manifest(run_dir: Path) -> dict | None:
    return read_json(run_dir / "corpus" / "manifest.json")


def store_state(run_dir: Path) -> dict | None:
    return read_json(run_dir / "activations" / "store.json")


def dump_summaries(run_dir: Path) -> list[dict]:
    folder = run_dir / "activations" / "summary"
    return [read_json(p) for p in sorted(folder.glob("process-*.json"))] if folder.is_dir() else []


def stage_records(run_dir: Path) -> list[dict]:
    folder = run_dir / "stages"
    if not folder.is_dir():
        return []
    records = [read_json(p) | {"_file": p.name} for p in sorted(folder.glob("*.json"))]
    return sorted(records, key=lambda r: (r.get("started", 0), r["_file"]))


def concept_eval(run_dir: Path) -> dict | None:
    return read_json(run_dir / "concepts" / "eval.json")


def random_init_eval(run_dir: Path) -> dict | None:
    """eval.json of the same fit on a random-init model of the same shape (the baseline stage), if it ran."""
    return read_json(run_dir / "baseline" / "concepts" / "eval.json")


def concept_bank(run_dir: Path):
    """The fitted ConceptBank of run_dir/concepts, or None when it was not written."""
    folder = run_dir / "concepts"
    if not (folder / "bank.json").is_file() or not (folder / "bank.safetensors").is_file():
        return None
    from emojax.concepts.bank import load_bank

    return load_bank(folder)


def best_layer(evaluation: dict | None, bank) -> int | None:
    """The layer the report shows (emojax.concepts.layer.choose_layer over the bank's layers, else eval.json's);
    None when there are none."""
    layers = list(bank.layers) if bank is not None else [int(k) for k in (evaluation or {}).get("per_layer", {})]
    return choose_layer(layers, evaluation=evaluation) if layers else None


def sae_metrics(run_dir: Path) -> list[dict]:
    """One row per trained SAE (a sweep file contributes one row per entry), in folder order."""
    folder = run_dir / "sae"
    if not folder.is_dir():
        return []
    rows = []
    for path in sorted([*folder.glob("metrics.json"), *folder.glob("*/metrics.json")]):
        value = read_json(path)
        for i, row in enumerate(value if isinstance(value, list) else [value]):
            if not isinstance(row, dict):
                raise ReportError(f"{path}: entry {i} is not an object")
            missing = [k for k in SAE_REQUIRED if k not in row and k != "name"]
            if missing:
                raise ReportError(f"{path}: entry {i} lacks {missing} (needs {list(SAE_REQUIRED)})")
            rows.append({"name": row.get("name", path.parent.name if path.parent != folder else f"sae_{i}"), **row})
    return rows


def top_tokens(run_dir: Path) -> dict | None:
    """validate/top_tokens.json (emojax.concepts.top_tokens), or None."""
    value = read_json(run_dir / "validate" / "top_tokens.json")
    if value is not None:
        _require(value, run_dir / "validate" / "top_tokens.json", ("summary", "concepts", "split", "layer"))
    return value


def template_curves(run_dir: Path) -> dict | None:
    """validate/templates.json (emojax.concepts.templates), or None; each template's readouts must be
    [values][concepts]."""
    path = run_dir / "validate" / "templates.json"
    value = read_json(path)
    if value is None:
        return None
    _require(value, path, ("summary", "concepts", "templates", "layer", "metric"))
    C = len(value["concepts"])
    for i, t in enumerate(value["templates"]):
        _require(t, path, ("name", "values", "readouts", "rho", "p", "expected"), f"templates[{i}]")
        if len(t["readouts"]) != len(t["values"]) or any(len(r) != C for r in t["readouts"]):
            raise ReportError(f"{path}: templates[{i}].readouts must be [values={len(t['values'])}][concepts={C}]")
    return value


def _require(value, path: Path, keys: tuple[str, ...], where: str = "") -> None:
    if not isinstance(value, dict):
        raise ReportError(f"{path}: {where or 'the file'} must be an object")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ReportError(f"{path}: {where + ' ' if where else ''}missing key(s) {missing}")


def steering_curves(run_dir: Path) -> dict | None:
    curves = read_json(run_dir / "steer" / "curves.json")
    if curves is not None and not isinstance(curves.get("concepts"), dict):
        raise ReportError(f"{run_dir / 'steer' / 'curves.json'}: needs a 'concepts' object")
    return curves


def monitored_sample(run_dir: Path) -> dict | None:
    sample = read_json(run_dir / "steer" / "monitor.json")
    if sample is None:
        return None
    path = run_dir / "steer" / "monitor.json"
    for key in ("tokens", "concepts", "readings"):
        if key not in sample:
            raise ReportError(f"{path}: missing key {key!r}")
    n_tok, n_con = len(sample["tokens"]), len(sample["concepts"])
    if len(sample["readings"]) != n_tok or any(len(r) != n_con for r in sample["readings"]):
        raise ReportError(f"{path}: readings must be [tokens={n_tok}][concepts={n_con}]")
    return sample


def experiment_results(run_dir: Path) -> dict | None:
    results = read_json(run_dir / "experiment" / "results.json")
    if results is None:
        return None
    for key in ("suite", "conditions", "rates", "dose_response", "published", "not_measured", "outcomes"):
        if key not in results:
            raise ReportError(f"{run_dir / 'experiment' / 'results.json'}: missing key {key!r}")
    return results


def screen_output(run_dir: Path) -> tuple[dict, pa.Table] | None:
    """screen/manifest.json and screen/scores.parquet (emojax screen --out RUN_DIR/screen), or None when the run
    has no screen; the scores must hold every screened concept's columns."""
    folder = run_dir / "screen"
    manifest = read_json(folder / "manifest.json")
    if manifest is None:
        return None
    _require(manifest, folder / "manifest.json", ("concepts", "flags", "settings", "samples", "layer"))
    path = folder / "scores.parquet"
    try:
        scores = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None
    by = manifest["settings"].get("flag", {}).get("by", "diff")
    needed = ["sample_id", "tokens"] + [column(k, c) for c in manifest["concepts"] for k in (by, "tokens")]
    missing = [c for c in needed if c not in scores.column_names]
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing}")
    return manifest, scores
