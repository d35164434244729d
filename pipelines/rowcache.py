"""Binary cache of parsed float32 rows: parse a CSV once, slice it cheaply after.

Layout: 24-byte header (magic, format version, columns, rows), then rows
row-major as little-endian float32, so any split slice is one contiguous read.
Written under a temporary name and renamed, so a crash never leaves a
half-written cache under the real name. A cache with another version, other
columns or the wrong size is treated as absent and rebuilt: it is derived data.
"""
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterable

import numpy as np

from pipelines.errors import DataError

MAGIC = b'FCROWS\x00\x00'
VERSION = 1
_HEADER = struct.Struct('<8sIIQ')


def cache_dir() -> str:
    """FASTCORE_CACHE_DIR, else ~/.cache/fastcore: data folders may be read-only."""
    return os.environ.get('FASTCORE_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'fastcore')


def cache_path(source: str) -> str:
    """Cache file for `source`, keyed by its path, size and mtime (a changed file re-parses)."""
    st = os.stat(source)
    key = f'{os.path.abspath(source)}\0{st.st_size}\0{st.st_mtime_ns}'.encode()
    stem = os.path.basename(source).split('.')[0]
    return os.path.join(cache_dir(), f'{stem}-{hashlib.sha256(key).hexdigest()[:16]}.rows')


def row_count(path: str, ncols: int) -> int | None:
    """Rows in a complete, current-version cache at `path`, else None."""
    try:
        with open(path, 'rb') as f:
            header = f.read(_HEADER.size)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    if len(header) != _HEADER.size:
        return None
    magic, version, cols, rows = _HEADER.unpack(header)
    if (magic, version, cols) != (MAGIC, VERSION, ncols):
        return None
    return rows if size == _HEADER.size + rows * ncols * 4 else None


def read_rows(path: str, ncols: int, rows: slice) -> np.ndarray:
    """Rows [start:stop) as float32 [n, ncols], reading only those bytes."""
    count = (rows.stop - rows.start) * ncols
    offset = _HEADER.size + rows.start * ncols * 4
    data = np.fromfile(path, dtype='<f4', count=count, offset=offset)
    return data.reshape(-1, ncols).astype(np.float32, copy=False)


def write_rows(path: str, ncols: int, blocks: Iterable[np.ndarray]) -> int:
    """Write all `blocks` to `path` atomically; returns the row count."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    except OSError as e:
        raise DataError(f'cannot write the data cache in {folder} ({e.strerror}): '
                        f'set FASTCORE_CACHE_DIR to a writable folder') from e
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(_HEADER.pack(MAGIC, VERSION, ncols, 0))
            rows = 0
            for block in blocks:
                f.write(np.ascontiguousarray(block, dtype='<f4').data)
                rows += len(block)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, VERSION, ncols, rows))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return rows
