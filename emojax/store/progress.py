"""The dump's progress bar: tokens/s, MB/s written and ETA (rich), silent when disabled."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn


class DumpProgress:
    def __init__(self, total_tokens: int, total_shards: int, enabled: bool = True):
        self.tokens = 0
        self.documents = 0
        self.shards = 0
        self.total_shards = total_shards
        self.started = time.perf_counter()
        self.bar = Progress(
            TextColumn("dump"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[shards]}"), TextColumn("{task.fields[rates]}"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not enabled, transient=False,
        )
        self.task = self.bar.add_task("dump", total=max(total_tokens, 1), shards=self._shards(), rates="")

    def _shards(self) -> str:
        return f"shard {min(self.shards + 1, self.total_shards)}/{self.total_shards}"

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def advance(self, tokens: int, documents: int, bytes_written: int) -> None:
        self.tokens += tokens
        self.documents += documents
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rates = f"{self.tokens / elapsed:,.0f} tok/s  {bytes_written / 1e6 / elapsed:,.1f} MB/s"
        self.bar.update(self.task, advance=tokens, rates=rates, shards=self._shards())

    def shard_done(self) -> None:
        self.shards += 1
        self.bar.update(self.task, shards=self._shards())
