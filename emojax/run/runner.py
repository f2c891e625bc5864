"""`run`: every stage of the method in order, in one run directory, skipping what is already done.

    train (built-in model only) -> corpus -> dump -> fit -> sae -> steer -> report

Each stage's fingerprint covers its own settings and its inputs' fingerprints, so a changed setting recomputes
that stage and everything downstream of it, and nothing else (records.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from emojax.run import stages
from emojax.run.config import RunFile
from emojax.run.records import StageRecords, fingerprint

console = Console(stderr=True)


def run(run_file: RunFile, show_progress: bool = True) -> dict:
    """Runs (or resumes) the configured stages; returns {stage: record}."""
    stages.check_run_file(run_file)
    run_dir = Path(run_file.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = StageRecords(run_dir)
    context = stages.Context(run_file=run_file, run_dir=run_dir, show_progress=show_progress)
    done = {}
    for name in run_file.run.stages:
        stage = stages.STAGES[name]
        settings = stage.settings(context)
        fp = fingerprint(name, settings, [context.fingerprints.get(d) for d in stage.depends])
        status = records.status(name, fp)
        record = records.read(name) if status == "complete" else None
        if record is not None:
            context.results[name] = record.get("summary", {})  # outputs_exist may need it (train: the path)
        if record is not None and stage.outputs_exist(context):
            console.print(f"[bold]{name}[/]: skipped (complete, inputs unchanged)")
            done[name] = {**record, "skipped": True}
            records.write(name, {**record, "skipped": True})
        else:
            if status == "changed":
                console.print(f"[bold]{name}[/]: settings or inputs changed; recomputing")
                for path in stage.outputs(context):
                    shutil.rmtree(path, ignore_errors=True)
            elif status == "resume":
                console.print(f"[bold]{name}[/]: resuming an unfinished run")
            else:
                console.print(f"[bold]{name}[/]: running")
            records.write(name, {"stage": name, "fingerprint": fp, "complete": False})
            started = time.perf_counter()
            try:
                summary = stage.run(context)
            except KeyboardInterrupt:
                console.print(f"[bold]{name}[/]: interrupted; run the same command again to resume")
                raise
            seconds = time.perf_counter() - started
            record = {"stage": name, "fingerprint": fp, "complete": True, "skipped": False,
                      "seconds": round(seconds, 2), "summary": summary}
            records.write(name, record)
            context.results[name] = summary
            done[name] = record
            console.print(f"[bold]{name}[/]: done in {seconds:.1f} s")
        context.fingerprints[name] = fp
    return done
