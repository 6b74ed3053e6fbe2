"""Directories local or remote (gs://): copy their files, keep a local copy of a remote one in the
cache, and write a new one whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from etils import epath

from qstar_jax.errors import CheckpointError, CheckpointNotFoundError, PathExistsError


def cache_root() -> Path:
    """Where local copies (the demo model, remote HF directories) live: $QSTAR_CACHE or
    ~/.cache/qstar_jax."""
    return Path(os.environ.get("QSTAR_CACHE") or Path.home() / ".cache" / "qstar_jax")


def copy_files(src: epath.Path, dst: epath.Path) -> None:
    """Copy the files of directory `src` (not its subdirectories) into `dst`; either side local
    or remote (gs://)."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if not file.is_dir():
            with file.open("rb") as fin, (dst / file.name).open("wb") as fout:
                shutil.copyfileobj(fin, fout, 2**24)


def local_dir(path: str | os.PathLike) -> Path:
    """A local directory with the files of the HF directory `path`, for the readers here, which
    open local files only.

    A local `path` comes back unchanged. A remote URI (gs://..., through etils.epath; gs:// needs
    gcsfs, the `tpu` extra) has its files (not subdirectories) copied once into
    cache_root()/remote/NAME-HASH; later calls reuse that copy (delete it to fetch again). The copy
    appears complete or not at all.
    """
    text = os.fspath(path)
    if "://" not in text:
        return Path(text)
    uri = text.rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_root() / "remote" / f"{uri.rsplit('/', 1)[-1]}-{digest}"
    if target.is_dir():
        return target
    try:
        source = epath.Path(uri)
        found = source.is_dir()
    except ImportError as e:  # e.g. gs:// without gcsfs
        raise CheckpointError(f"{uri}: cannot be read here ({e}); gs:// paths need the `tpu` "
                              "extra: pip install -e '.[tpu]'") from None
    if not found:
        raise CheckpointNotFoundError(f"{uri}: no such checkpoint directory")
    try:
        with atomic_dir(target) as tmp:
            copy_files(source, epath.Path(tmp))
    except OSError:  # another process may have made the copy meanwhile
        if not target.is_dir():
            raise
    return target


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to fill, renamed to `path` on success and removed on failure,
    so the directory appears complete or not at all."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PathExistsError(f"{path}: already exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

