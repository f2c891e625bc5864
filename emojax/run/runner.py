"""`run`: every stage of the method in order, in one run directory, skipping what is already done.

    train (built-in model only) -> corpus -> dump -> fit -> validate -> baseline -> sae -> steer -> experiment
    -> report

Each stage's fingerprint covers the settings that change its outputs (fingerprints.py) and its inputs'
fingerprints, so a changed setting recomputes that stage and everything downstream of it, and nothing else.
A stage left out of `run.stages` is read from its record on disk: `run.stages=[fit]` refits on the store the
dump wrote, and skips the fit if nothing it depends on changed. Old outputs of a recomputed stage are moved to
`<output>.old-<time>/`, never deleted. One `emojax run` at a time per run directory (an fcntl lock).
"""

from __future__ import annotations

import time
from pathlib import Path

from emojax.errors import ConfigError
from emojax.fileio import move_aside
from emojax.locks import LockedError, WriterLock, holder
from emojax.progress import fmt, log
from emojax.run import stages
from emojax.run.config import RunFile
from emojax.run.records import StageRecords, fingerprint


def run(run_file: RunFile, show_progress: bool = True) -> dict:
    """Runs (or resumes) the configured stages; returns {stage: record}."""
    stages.check_run_file(run_file)
    run_dir = Path(run_file.run.dir)
    with WriterLock(run_dir, what="run directory"):
        return _run(run_file, run_dir, show_progress)


def _stage_fingerprint(name: str, context: stages.Context) -> str:
    stage = stages.STAGES[name]
    return fingerprint(name, stage.settings(context), [context.fingerprints.get(d) for d in stage.depends])


def _read_upstream(name: str, records: StageRecords, context: stages.Context) -> None:
    """A stage outside run.stages: its fingerprint and summary come from its complete record on disk."""
    record = records.complete(name)
    if record is None:
        return
    context.fingerprints[name] = record["fingerprint"]
    context.results[name] = record.get("summary", {})
    try:
        wanted = _stage_fingerprint(name, context)
    except Exception:  # noqa: BLE001 - only a warning: the record on disk is what the next stages use
        wanted = None
    if wanted != record["fingerprint"]:
        log(f"{name}: not in run.stages; its settings in the config differ from the run recorded in "
            f"{records.folder}/{name}.json, which is what later stages use", style="yellow")


def _refuse_if_written(path: Path) -> None:
    """An output folder that another process is writing (a per-stage command) is never moved under it."""
    for folder in (path, *(p for p in path.glob("*") if p.is_dir())) if path.is_dir() else ():
        who = holder(folder)
        if who:
            raise LockedError(f"{folder}: another emojax process is writing it ({who}); it would have to be moved "
                              "aside to recompute this stage. Wait for it to finish or stop it, then rerun")


def _run(run_file: RunFile, run_dir: Path, show_progress: bool) -> dict:
    records = StageRecords(run_dir)
    context = stages.Context(run_file=run_file, run_dir=run_dir, show_progress=show_progress)
    selected = set(run_file.run.stages)
    if records.complete("train") is None:
        # The model every stage reads comes from the train stage: a no-op for a checkpoint, a cache lookup (or
        # the training, the first time) for a built-in model. Never a preset's default in its place.
        selected.add("train")
    needed = {d for name in selected for d in stages.STAGES[name].depends}
    for name in sorted(needed - selected):  # before anything runs
        if records.complete(name) is None:
            raise ConfigError(f"run.stages={list(run_file.run.stages)}: a selected stage needs {name!r}, which has "
                              f"not completed in {run_dir} (no complete {records.folder}/{name}.json); add {name} "
                              "to run.stages")
    done = {}
    for name, stage in stages.STAGES.items():
        if name not in selected:
            _read_upstream(name, records, context)
            continue
        fp = _stage_fingerprint(name, context)
        status = records.status(name, fp)
        record = records.read(name) if status == "complete" else None
        if record is not None:
            context.results[name] = record.get("summary", {})  # outputs_exist may need it (train: the path)
        if status == "complete" and not stage.outputs_exist(context):
            status = "resume"  # finished once with these inputs, then partly removed: the stage redoes what is gone
        if status == "complete":
            if stage.wants_check(context):
                log(f"{name}: complete; checking its outputs")
                log(f"{name}: {stage.check(context)}")
            else:
                log(f"{name}: skipped (complete, inputs unchanged)")
            done[name] = {**record, "skipped": True}
        else:
            if status == "resume":
                log(f"{name}: resuming an unfinished run")
            else:
                log(f"{name}: " + ("settings or inputs changed; recomputing" if status == "changed" else "running"))
                for path in stage.outputs(context):
                    _refuse_if_written(path)
                    moved = move_aside(path)
                    if moved is not None:
                        log(f"{name}: the previous output {path} was moved to {moved} (delete it when you no "
                            "longer need it)")
            records.write(name, {"stage": name, "fingerprint": fp, "complete": False})
            started = time.perf_counter()
            try:
                summary = stage.run(context)
            except KeyboardInterrupt:
                log(f"{name}: interrupted; run the same command again to resume")
                raise
            seconds = time.perf_counter() - started
            record = {"stage": name, "fingerprint": fp, "complete": True, "skipped": False,
                      "seconds": round(seconds, 2), "summary": summary}
            records.write(name, record)
            context.results[name] = summary
            done[name] = record
            log(f"{name}: done in {fmt(seconds)} s")
        context.fingerprints[name] = fp
    return done
