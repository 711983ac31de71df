"""The errors a user's input can cause, each with a one-line message: the CLI prints ``ducat: error: ...``
and exits 2. Kept free of torch so that the command line can set up its runtime before torch loads."""

from ducat.config.schema import ConfigError
from ducat.fileio import RunDirError, RunLockedError


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, unsafe or does not fit; the message is one line."""


class DataError(ValueError):
    """Unknown dataset, missing or malformed data files; the message is one line."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirError)

__all__ = ["USER_ERRORS", "CheckpointError", "ConfigError", "DataError", "RunDirError", "RunLockedError"]
