"""User-facing errors.

Every error a user can cause by a recipe, a file, a command-line argument or a
checkpoint is an :class:`AEVBError`. The command line prints it as one line,
with no traceback, and exits with ``exit_code``; ``pyro-aevb --debug`` shows
the traceback.
"""


class AEVBError(Exception):
    """Base class: a problem the user can fix. The message names it and the fix."""

    exit_code = 1


class ConfigError(AEVBError):
    """A bad recipe, ``--set`` override or command-line argument (a usage error)."""

    exit_code = 2


class DataError(AEVBError):
    """A missing, truncated or malformed data file, or data unfit for the model."""


class CheckpointError(AEVBError):
    """A checkpoint that cannot be loaded safely, or belongs to another recipe."""


class TrainingError(AEVBError):
    """Training cannot go on, e.g. a non-finite loss or gradient."""


class Interrupted(AEVBError):
    """SIGINT or SIGTERM stopped a run cleanly, after a final checkpoint."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.exit_code = 130 if signal_name == "SIGINT" else 143
