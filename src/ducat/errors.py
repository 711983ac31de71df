"""The errors a user's input or environment can cause, each with a one-line message: the CLI prints
``ducat: error: ...`` and exits 2 for every class in :data:`USER_ERRORS`. One module for all of them, free of
torch and of every other ducat module, so that any layer can raise them and the command line can catch them before
torch loads."""


class ConfigError(ValueError):
    """A bad configuration value or file; the message is one line."""


class DataError(ValueError):
    """Unknown dataset, missing or malformed data files; the message is one line."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, unsafe or does not fit; the message is one line."""


class RunDirError(ValueError):
    """A run directory that cannot be created or locked; the message is one line."""


class RunLockedError(RunDirError):
    """Another process holds the run directory's lock; the message names it and says what to do."""


class RunError(RuntimeError):
    """A run that cannot start or continue (existing run without resume, non-finite loss, ...)."""


class MetricsError(ValueError):
    """A run's ``metrics.jsonl`` is missing, unreadable, malformed or holds no complete row."""


class UsageError(ValueError):
    """Bad command-line usage; one line."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirError, RunError, MetricsError, UsageError)

__all__ = ["USER_ERRORS", "CheckpointError", "ConfigError", "DataError", "MetricsError", "RunDirError", "RunError",
           "RunLockedError", "UsageError"]
