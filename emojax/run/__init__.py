"""`emojax run`: every stage of the method in one resumable run directory (runner.py), configured by one file."""

from emojax.run.config import RunFile, RunSection, load_run_file
from emojax.run.runner import run

__all__ = ["RunFile", "RunSection", "load_run_file", "run"]
