"""The one reader of JSON files and the one of JSONL lines; each error names the file (and line).

A JSONL file holds one JSON object per line. Blank lines are skipped; any other line that is not
a UTF-8 JSON object is an error naming FILE:LINE, for the user to fix or delete: a corpus or a
task file is never read with lines silently dropped. Paths are local or remote (`gs://`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from etils import epath

from qstar_jax.errors import DataError, InputError, PathNotFoundError


def read_json(path: str | os.PathLike, error: type[InputError] = DataError,
              missing: type[PathNotFoundError] = PathNotFoundError) -> Any:
    """The content of the UTF-8 JSON file `path`: `missing` if there is no such file, `error` if
    it is not UTF-8 JSON."""
    file = epath.Path(path)
    if not file.is_file():
        raise missing(f"{path}: no such file")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid UTF-8 JSON ({e})") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, object) per non-blank line of a JSONL file, `where` being "path:line"; a line that
    is not a UTF-8 JSON object is a DataError there (see the module doc)."""
    with epath.Path(path).open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (invalid byte at column "
                                f"{e.start + 1}); the file must be JSONL") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg.removesuffix(' at')} at "
                                f"column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj
