"""Write files so a crash never leaves a half-written one (temp file in the same folder, then rename), and
check up front that a folder a run will write can be written."""
from __future__ import annotations

import json
import os
import tempfile

from fastcore.errors import UsageError


def write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_writable(name: str, folder: str | None) -> None:
    """Fail before training, not after it: the nearest existing ancestor must be a writable folder."""
    if folder is None:
        return
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{name} {folder!r}: {existing!r} is a file, not a folder; choose another {name}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{name} {folder!r}: {existing!r} is not writable; choose another {name}")
