"""Output paths checked before long work starts, so that a bad path never costs a finished
result: a workdir that can be written, a new output directory, and an output file whose
directory takes it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from etils import epath

from qstar_jax.errors import ConfigError, PathExistsError, PathNotFoundError


def prepare_workdir(workdir: str, process_index: int = 0) -> None:
    """Create `workdir` if needed and check that files can be written there; a ConfigError
    naming it otherwise."""
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{process_index}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); choose "
                          "a directory you can write to") from None


def check_output_dir(path: str, flag: str = "--out") -> None:
    """`path` can become a new directory: it is not a file or a non-empty directory, and its
    nearest existing ancestor takes new entries (an InputError naming the flag otherwise).
    Nothing is left behind."""
    directory = Path(path).absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise PathExistsError(f"{flag}={path}: already exists and is not an empty directory; "
                              "choose a new path")
    ancestor = next(p for p in directory.parents if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write_test_"))
    except OSError as e:
        raise ConfigError(f"{flag}={path}: cannot write in {ancestor} ({e.strerror or e}); "
                          "choose a directory you can write to") from None


def check_output_file(path: str, flag: str = "--out") -> None:
    """`path` can be written (its directory exists and takes a file); an InputError
    naming the flag otherwise. Nothing is left behind."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise PathNotFoundError(f"{flag}={path}: the directory {directory} does not exist; "
                                "create it or choose another path")
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}={path}: cannot write it ({e.strerror or e}); choose another "
                          "path") from None
    if not existed:
        os.remove(path)
