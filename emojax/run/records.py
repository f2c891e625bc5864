"""Stage records of a run directory: stages/NAME.json says which inputs a stage ran with and whether it finished.

A stage whose record is complete with the same fingerprint is skipped; one whose fingerprint changed has its
outputs removed and is recomputed; one that started with the same fingerprint but did not finish (a crash,
Ctrl-C) is run again and resumes where the stage itself can (the dump skips complete shards, the SAE and the
LM training continue from their last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class StageRecords:
    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / "stages"

    def read(self, stage: str) -> dict | None:
        try:
            return json.loads((self.folder / f"{stage}.json").read_text())
        except (OSError, ValueError):
            return None

    def write(self, stage: str, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{stage}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.folder / f"{stage}.json")

    def status(self, stage: str, fp: str) -> str:
        """'complete' (skip), 'resume' (same inputs, unfinished), 'changed' (redo from scratch) or 'new'."""
        record = self.read(stage)
        if record is None:
            return "new"
        if record.get("fingerprint") != fp:
            return "changed"
        return "complete" if record.get("complete") else "resume"
