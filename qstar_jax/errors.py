"""The project's error types: what a user got wrong, as opposed to a bug.

A command line prints an `InputError` or a `RunStopped` in one line and exits non-zero; any other
exception is a bug and keeps its traceback. Each type is also the builtin error its callers would
expect (ValueError, and FileNotFoundError, FileExistsError, NotImplementedError or TypeError
where that is what went wrong; RuntimeError for a run that stopped).
"""


class InputError(ValueError):
    """A user mistake: settings, paths, data or checkpoints that cannot be used as given."""


class ConfigError(InputError):
    """Settings that are unknown, out of range or inconsistent with each other."""


class ConfigTypeError(ConfigError, TypeError):
    """A setting of the wrong kind, or one that cannot be set here."""


class DataError(InputError):
    """Text, JSONL, tokenizer files or batches that cannot be read or used."""


class PathNotFoundError(InputError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class PathExistsError(InputError, FileExistsError):
    """A file or directory the user asked to be written already exists."""


class UnsupportedError(InputError, NotImplementedError):
    """A file in a format or variant this project does not read."""


class CheckpointError(InputError):
    """A checkpoint's files are not what this model can load or write, or no saved step of a
    training workdir can be restored."""


class CheckpointNotFoundError(CheckpointError, PathNotFoundError):
    """A checkpoint directory or file is missing."""


class RunStopped(RuntimeError):
    """Neither a mistake nor a bug: a run that stopped short (a NaN loss, SIGTERM), with what
    was kept and what to do next in its message."""
