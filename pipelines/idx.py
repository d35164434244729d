"""IDX files (the MNIST format), plain or gzip, validated before use.

A truncated download or a swapped file must fail with the file's name,
not as a reshape error deep inside training.
"""
import gzip
import os
import struct
import zlib

import numpy as np

from pipelines.errors import DataError

IMAGES_MAGIC = 2051  # uint8 data, 3 dimensions
LABELS_MAGIC = 2049  # uint8 data, 1 dimension


def read_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array stored in `path`, shaped by its header."""
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f'{path!r}: too short for an IDX header ({len(raw)} bytes); re-download it')
    (found,) = struct.unpack('>i', raw[:4])
    if found != magic:
        raise DataError(f'{path!r}: IDX magic {found}, expected {magic}; wrong or corrupt file, re-download it')
    dims = struct.unpack(f'>{ndim}i', raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f'{path!r}: {len(raw)} bytes but its header {dims} needs {expected}; re-download it')
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, 'rb') as f:
            raw = f.read()
        if path.endswith('.gz'):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f'{path!r}: file not found') from e
        raise DataError(f'{path!r}: unreadable or corrupt ({e}); re-download it') from e
    if not raw:
        raise DataError(f'{path!r}: file is empty; re-download it')
    return raw


def find_file(folder: str, stem: str) -> str | None:
    """`stem` or `stem.gz` inside `folder`, whichever exists."""
    for name in (stem + '.gz', stem):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None
