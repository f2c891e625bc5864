"""SAE training checkpoints with orbax: the whole train state (params, Adam state, statistics, step) plus a JSON
record (data position, input scale, the settings that fix the math). Saves are asynchronous; a run killed at
any point resumes from the last committed checkpoint and reproduces the uninterrupted run exactly. Orbax commits a
step by renaming its finished temporary folder, so a crash or a full disk never damages an earlier step; a full
disk is a one-line DiskFullError.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from emojax.errors import CheckpointError
from emojax.fileio import disk_full, disk_full_cause


class SaeCheckpoints:
    def __init__(self, directory: str | Path, every: int, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(every, 1),
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        try:
            return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                   meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:
            self._raise_disk_full(e, step)
            raise

    def meta(self) -> dict | None:
        """The JSON record of the latest checkpoint, read without its state (compared before the state is)."""
        step = self.manager.latest_step()
        if step is None:
            return None
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot read the checkpoint's record ({e}); delete "
                                  "that step folder to resume from the one before, or use another sae.out") from None

    def restore(self, abstract_state) -> tuple[object, dict] | None:
        """(state placed with the shardings of `abstract_state`, meta) of the latest checkpoint, or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the SAE state ({e}); it was written "
                                  "by a run with other settings: use another out directory") from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._raise_disk_full(e, self.manager.latest_step())
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def _raise_disk_full(self, error: BaseException, step) -> None:
        if disk_full_cause(error) is not None:
            raise disk_full(f"{self.directory}/{step}") from None


def abstract_like(state, shardings):
    """ShapeDtypeStructs with shardings: the restore target, built without allocating."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
