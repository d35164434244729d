"""Files fastcore writes and reads back: a crash never leaves a half-written one (temp file in the same
folder, then rename), summary-like JSON is always valid JSON, a file in a folder others may write is never
opened through a planted symbolic link, and a folder a run will write is checked up front."""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile

from fastcore.errors import UsageError


def write_text(path: str, text: str | bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # mkstemp creates a fresh name with O_EXCL (never an existing file or link), and rename replaces a link at
    # `path` rather than writing through it.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, data: dict) -> None:
    """Strict JSON (no bare NaN/Infinity, which most readers reject): a non-finite float is written as null,
    and a top-level "nonfinite" object says which (its path, e.g. "history[1].eval_loss") held what ("nan")."""
    found: dict[str, str] = {}
    clean = _finite(data, "", found)
    if found:
        clean["nonfinite"] = found
    write_text(path, json.dumps(clean, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _finite(value, where: str, found: dict):
    if isinstance(value, float) and not math.isfinite(value):
        found[where] = str(value)   # "nan", "inf" or "-inf"
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def read_json_object(path: str, what: str, fix: str) -> dict:
    """A JSON object fastcore wrote earlier; damaged or not an object: UsageError naming the file and `fix`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"{what} {path!r} cannot be read ({e.strerror or e}): {fix}") from None
    except ValueError as e:
        raise UsageError(f"{what} {path!r} is damaged (not JSON: {str(e).splitlines()[0]}): {fix}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path!r} is damaged (not a JSON object): {fix}")
    return data


def open_private(path: str, what: str, create: bool = True) -> int:
    """A file descriptor for `path`, a lock or cache file in a folder other users may write: created 0o600
    (`create`, opened read-write; else read-only), never opened through a symbolic link (a planted link would
    make fastcore write or trust what it points to), and only a regular file. Anything
    else is refused with a UsageError naming it; a missing file (not `create`) raises FileNotFoundError."""
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{what} {path!r} is a symbolic link, which fastcore does not follow: "
                             f"remove it (someone else may have planted it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{what} {path!r} is not a regular file (a device or pipe): "
                         f"remove it (someone else may have planted it)")
    return fd


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
