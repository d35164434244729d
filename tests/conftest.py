"""Shared fixtures: where the real data lives, and a quiet TensorFlow."""
from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
    """$FASTCORE_DATA_DIR, else ../shared/data beside the checkout (where CI puts it)."""
    return pathlib.Path(os.environ.get("FASTCORE_DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> str:
    path = shared_data_dir()
    assert path.is_dir(), f"real data not found at {path}: set FASTCORE_DATA_DIR"
    return str(path)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Parsed-data caches go to a per-session temp folder, never the user's ~/.cache."""
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def quiet_timing(monkeypatch):
    """No neighbour: every timing of an auto decision is judged quiet (fastcore.observe.timing), so cached."""
    from fastcore.observe import timing
    monkeypatch.setattr(timing, "SPREAD", float("inf"))
    monkeypatch.setattr(timing, "BUSY", float("inf"))
