"""User-facing errors.

An `EmojaxError` is something the user can fix (a bad checkpoint, config or corpus row): the CLI prints its
message alone, without a traceback. Anything else is a bug and keeps its traceback.
"""


class EmojaxError(Exception):
    """An error caused by user input; its message names the file/key/row and what to do."""


class CheckpointError(EmojaxError):
    """A checkpoint directory that emojax cannot load exactly."""


class ConfigError(EmojaxError):
    """A config file or override that is invalid."""


class InputError(EmojaxError, ValueError):
    """Arguments of the wrong shape or range (tokens, masks, capture indices, steering arrays)."""
