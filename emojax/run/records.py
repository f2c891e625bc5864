"""Stage records of a run directory: stages/NAME.json says which inputs a stage ran with and whether it finished.

A stage whose record is complete with the same fingerprint is skipped (and its record is not rewritten); one
whose fingerprint changed is recomputed after its old outputs are moved aside to `<output>.old-<time>/`
(nothing is deleted); one that started with the same fingerprint but did not finish (a crash, Ctrl-C) is run
again and resumes where the stage itself can (the dump skips complete shards, the SAE and the LM training
continue from their last checkpoint). Records are written atomically (temp + fsync + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

from emojax.digest import digest
from emojax.fileio import write_json


def fingerprint(*parts) -> str:
    return digest(parts)


class StageRecords:
    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / "stages"

    def read(self, stage: str) -> dict | None:
        try:
            return json.loads((self.folder / f"{stage}.json").read_text())
        except (OSError, ValueError):
            return None

    def complete(self, stage: str) -> dict | None:
        record = self.read(stage)
        return record if record is not None and record.get("complete") else None

    def write(self, stage: str, record: dict) -> None:
        write_json(self.folder / f"{stage}.json", record, sort_keys=True)

    def status(self, stage: str, fp: str) -> str:
        """'complete' (skip), 'resume' (same inputs, unfinished), 'changed' (redo from scratch) or 'new'."""
        record = self.read(stage)
        if record is None:
            return "new"
        if record.get("fingerprint") != fp:
            return "changed"
        return "complete" if record.get("complete") else "resume"
