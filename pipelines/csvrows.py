"""Numeric CSV (plain or gzip) to float32 row blocks, with exact error lines.

One thread reads and inflates (python-isal, which releases the GIL) into
chunks of whole lines, counting lines; a pool of one thread per core parses
chunks with pyarrow.csv (C++, GIL released), checks them and makes row-major
float32; blocks come out in file order. Memory stays bounded: a few 8 MB
chunks in flight, never the whole file. A chunk pyarrow rejects is bisected
with pyarrow itself to name the first bad line.

Values are parsed as float64 and then rounded to float32, exactly as
np.loadtxt(dtype=float32) did before (a direct float32 parse rounds once, and
differs from it on decimals just past a float32 rounding midpoint).

Measured on a full-size file in the real UCI format (tools/make_higgs.py:
11,000,000 rows of `%.18e`, 3.2 GB gzip at level 3, 8.0 GB of text), 2 cores,
runs that another job disturbed were repeated:
  this 18.9-21.1 s, 0.52-0.58 Mrows/s (median 0.56, 8 runs), peak RSS 155 MB;
    building the row cache with it (written, CRC'd) 19.0 s, 0.58 Mrows/s;
  before (a zlib thread + np.loadtxt) 77 s, 0.14 Mrows/s (0.133-0.135 on the
    first 1M rows).
First 1M rows, Mrows/s, 3 runs each: inflate alone with zlib 0.35, zlib-ng
0.65-0.66, isal 0.73-0.74; pyarrow.csv.read_csv straight on the .gz 0.36 (and
the whole table in memory); pyarrow's streaming reader on its own gzip stream
0.38, on isal's igzip_threaded 0.51-0.52 (but no way to name a bad line);
this 0.49-0.54 with 8 MB chunks (2-4 MB 0.45-0.49, 32 MB 0.42; one
multi-threaded pyarrow parse per chunk instead of a pool: more CPU).
CPU per million rows: inflate 1.35 s (zlib 2.9), pyarrow parse ~1.6 (its
tokenizer alone 1.4), line count 0.16 (bytes.count: 0.63), row-major float32
0.16: ~3.3 s in all, so two free cores top out near 0.6 Mrows/s; one gzip
stream cannot be inflated in parallel. A direct float32 parse saved nothing
measurable.
"""
import collections
import concurrent.futures
import os
import queue
import threading
import zlib
from collections.abc import Iterator

import numpy as np

from pipelines.errors import DataError

_READ = 1 << 20          # compressed bytes inflated per call
_CHUNK = 1 << 23         # text bytes per pyarrow parse (whole lines)
_BLOCK = 1 << 20         # pyarrow's own block within a chunk
_QUEUE = 2               # chunks inflated ahead of the parser


def iter_rows(path: str, ncols: int, label_values=None, progress=None) -> Iterator[np.ndarray]:
    """float32 blocks [n, ncols] of the file, in order; DataError names the bad line.

    `label_values`, if given, are the only values allowed in column 0; the other
    columns must be finite. `progress`, if given, gets update(rows, bytes of the
    file consumed) after each block and close() at the end.
    """
    parse = _Parser(path, ncols, label_values)
    workers = _workers()
    rows, finished = 0, False
    try:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='csvrows') as pool:
            pending = collections.deque()    # (future block, file bytes consumed), in file order
            try:
                try:
                    for first_line, text, consumed in _prefetched(_text_chunks(path)):
                        pending.append((pool.submit(parse, first_line, text), consumed))
                        while len(pending) > workers or (pending and pending[0][0].done()):
                            block, consumed = _next(pending)
                            rows += len(block)
                            if progress is not None:
                                progress.update(rows, consumed)
                            yield block
                except DataError:                # a gzip error: a bad line before it is named first
                    while pending:
                        _next(pending)
                    raise
                while pending:
                    block, consumed = _next(pending)
                    rows += len(block)
                    if progress is not None:
                        progress.update(rows, consumed)
                    yield block
            finally:
                for future, _ in pending:
                    future.cancel()
        finished = True
    finally:
        if progress is not None:
            progress.close(finished)
    if rows == 0:
        raise DataError(f'{path!r}: no data rows; the file is empty, re-download it')


def _next(pending):
    future, consumed = pending.popleft()
    return future.result(), consumed


def _workers() -> int:
    """Chunks parsed at once: one per core, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class _Parser:
    """One chunk of whole lines -> float32 [n, ncols], or a DataError naming the first bad line."""

    def __init__(self, path, ncols, label_values):
        import pyarrow as pa
        import pyarrow.csv as pcsv

        self.pa, self.pcsv = pa, pcsv
        self.path, self.ncols = path, ncols
        self.labels = None if label_values is None else np.asarray(label_values, np.float32)
        names = [str(i) for i in range(ncols)]
        self.options = dict(
            read_options=pcsv.ReadOptions(column_names=names, block_size=_BLOCK, use_threads=False),
            # No quoting, no escapes: numbers only, and the parser's fastest path.
            parse_options=pcsv.ParseOptions(quote_char=False, double_quote=False, escape_char=False),
            # float64 then rounded to float32, as np.loadtxt did; no value means "missing".
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.float64() for n in names}, null_values=[],
                strings_can_be_null=False, quoted_strings_can_be_null=False))

    def __call__(self, first_line: int, text) -> np.ndarray:
        """`text`: bytes or a memoryview of them."""
        try:
            table = self._table(text)
        except self.pa.ArrowInvalid:
            self._raise_unparseable(first_line, bytes(text))
        block = _row_major(table, self.ncols)
        if self.labels is not None:
            bad = ~np.isin(block[:, 0], self.labels)
            if bad.any():
                number, _ = _row_line(bytes(text), first_line, int(np.argmax(bad)))
                raise DataError(f'{self.path!r}: line {number} has label {block[np.argmax(bad), 0]:g}, '
                                f'expected one of {[float(v) for v in self.labels]}')
        finite = np.isfinite(block)
        if not finite.all():
            number, line = _row_line(bytes(text), first_line, int(np.argmin(finite.all(axis=1))))
            raise DataError(f'{self.path!r}: line {number} has a NaN or infinite value: '
                            f'{line[:80].decode(errors="replace")!r}; the file is corrupt, re-download it')
        return block

    def _table(self, text):
        return self.pcsv.read_csv(self.pa.py_buffer(text), **self.options)

    def _parses(self, text: bytes) -> bool:
        try:
            self._table(text)
            return True
        except self.pa.ArrowInvalid:
            return False

    def _raise_unparseable(self, first_line, text):
        """Bisect for the first line pyarrow rejects (error path only: ~15 parses of the chunk)."""
        lines = text.split(b'\n')
        good, bad = 0, len(lines)    # lines[:good] parse, lines[:bad] do not
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if self._parses(b'\n'.join(lines[:mid])) else (good, mid)
        number, line = first_line + good, lines[good].rstrip(b'\r')
        fields = len(line.split(b','))
        if fields != self.ncols:
            raise DataError(f'{self.path!r}: line {number} has {fields} fields, expected {self.ncols}')
        raise DataError(f'{self.path!r}: line {number} has a non-numeric field: '
                        f'{line[:80].decode(errors="replace")!r}')


def _row_major(table, ncols: int) -> np.ndarray:
    """float64 columns -> one row-major float32 array, a record batch at a time (cache-sized)."""
    out = np.empty((table.num_rows, ncols), np.float32)
    start = 0
    for batch in table.to_batches():
        stop = start + batch.num_rows
        rows = out[start:stop]
        for j, column in enumerate(batch.columns):
            rows[:, j] = column.to_numpy(zero_copy_only=True)
        start = stop
    return out


def _row_line(text: bytes, first_line: int, row: int) -> tuple[int, bytes]:
    """(1-based line number, line) of data row `row` of a chunk; empty lines hold no row."""
    for number, line in enumerate(text.split(b'\n'), start=first_line):
        line = line.rstrip(b'\r')
        if line:
            if row == 0:
                return number, line
            row -= 1
    raise AssertionError('row outside its chunk')


def _text_chunks(path: str) -> Iterator[tuple[int, memoryview, int]]:
    """(1-based number of the first line, about _CHUNK bytes of whole lines, file bytes consumed)."""
    line, pending, size = 1, [], 0
    for data, consumed in _chunks(path):
        pending.append(data)
        size += len(data)
        if size < _CHUNK:
            continue
        data, start = b''.join(pending), 0
        view = memoryview(data)          # chunks are views: no copy of the text
        while len(data) - start >= _CHUNK:
            cut = data.rfind(b'\n', start, start + _CHUNK) + 1
            if cut <= start:             # a line longer than a chunk: take it whole
                cut = data.find(b'\n', start + _CHUNK) + 1
                if not cut:
                    break
            text = view[start:cut]
            yield line, text, consumed
            line += _newlines(text)
            start = cut
        pending, size = [data[start:]], len(data) - start
    data = b''.join(pending)
    if data.strip():
        yield line, data, os.path.getsize(path)


def _newlines(text) -> int:
    # numpy: 4x less CPU than bytes.count (0.16 s per million %.18e rows, against 0.63)
    return int(np.count_nonzero(np.frombuffer(text, np.uint8) == ord('\n')))


def _chunks(path: str) -> Iterator[tuple[bytes, int]]:
    """(raw or inflated bytes, file bytes consumed); a gzip error or truncation becomes a DataError."""
    with open(path, 'rb') as f:
        if not path.endswith('.gz'):
            while raw := f.read(_CHUNK):
                yield raw, f.tell()
            return
        try:
            from isal import isal_zlib   # the same API as zlib, inflating about 2x faster
        except ImportError:
            isal_zlib = zlib

        def inflater():
            return isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)

        inflate = inflater()
        try:
            if f.read(2) not in (b'\x1f\x8b', b''):
                raise zlib.error('no gzip header')
            f.seek(0)
            while raw := f.read(_READ):
                while raw:
                    yield inflate.decompress(raw), f.tell()
                    raw = inflate.unused_data if inflate.eof else b''
                    if raw:  # concatenated gzip members, as `cat a.gz b.gz` makes
                        inflate = inflater()
        except (isal_zlib.error, zlib.error) as e:
            raise DataError(f'{path!r}: corrupt gzip data ({e}); re-download it') from e
        if not inflate.eof and f.tell() > 0:
            raise DataError(f'{path!r}: gzip stream is truncated; re-download it')


def _prefetched(items: Iterator) -> Iterator:
    """`items` produced on a background thread; its errors re-raised here."""
    q = queue.Queue(_QUEUE)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
