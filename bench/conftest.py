"""Session state for the benchmarks: data, the calibration kernel, and figures later cases divide by."""
from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: a tiny configuration that runs in seconds (CI runs only these)")


@pytest.fixture(scope="session")
def data_dir() -> str:
    path = pathlib.Path(os.environ.get("FASTCORE_DATA_DIR") or ROOT.parent / "shared" / "data")
    assert path.is_dir(), f"real data not found at {path}: set FASTCORE_DATA_DIR"
    return str(path)


@pytest.fixture(scope="session")
def kernel():
    import harness
    return harness.Kernel()


@pytest.fixture(scope="session")
def measured() -> dict:
    """{(task, label): examples/s} of the cases run so far: Keras fit per steps_per_execution, eager."""
    return {}
