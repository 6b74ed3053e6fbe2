"""Shared test setup: caches (the demo model's HF copy) go to a per-session temporary directory."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def qstar_cache(tmp_path_factory):
    """Point $QSTAR_CACHE at a fresh directory so tests never write to the home directory."""
    old = os.environ.get("QSTAR_CACHE")
    os.environ["QSTAR_CACHE"] = str(tmp_path_factory.mktemp("qstar_cache"))
    yield os.environ["QSTAR_CACHE"]
    if old is None:
        os.environ.pop("QSTAR_CACHE", None)
    else:
        os.environ["QSTAR_CACHE"] = old
