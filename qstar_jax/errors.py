"""The error types of checkpoints, every format: files that cannot be found, read or written.

Both are ValueErrors (a command line reports them in one line); CheckpointNotFoundError is also
a FileNotFoundError.
"""


class CheckpointError(ValueError):
    """A checkpoint's files are not what this model can load or write, or no saved step of a
    training workdir can be restored."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or file is missing."""
