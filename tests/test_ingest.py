"""HIGGS ingest: the checksummed row cache, one builder at a time, the pyarrow parser, progress lines."""
import decimal
import errno
import fcntl
import gzip
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pipelines import DataError, csvrows, higgs, progress, rowcache
from pipelines.progress import Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(os.environ.get('FASTCORE_DATA_DIR') or os.path.join(REPO, '..', 'shared', 'data'),
                      'higgs', 'HIGGS-sample.csv.gz')
# The parser before pyarrow: np.loadtxt over blocks of whole lines with exactly these arguments.
OLD_PARSER = dict(delimiter=',', dtype=np.float32, comments=None, ndmin=2)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv('FASTCORE_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv('FASTCORE_DATA_DIR', raising=False)


def _values(n, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 1.5, (n, 29))
    data[:, 0] = rng.integers(0, 2, n)
    return data


def _write(path, data, fmt='%.9g', gz=True):
    text = ''.join(','.join(fmt % v for v in row) + '\n' for row in data).encode()
    path.write_bytes(gzip.compress(text, compresslevel=1) if gz else text)
    return str(path)


def _csv(tmp_path, n=3000, name='HIGGS.csv.gz'):
    return _write(tmp_path / name, _values(n))


def _parse_all(path):
    return np.concatenate(list(csvrows.iter_rows(path, 29, (0.0, 1.0))))


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# ---- the cache's checksum -------------------------------------------------

def _damage_rows(cache, start, count, payload):
    with open(cache, 'r+b') as f:
        f.seek(rowcache._HEADER.size + start * 29 * 4)
        f.write(payload(count * 29))


@pytest.mark.parametrize('damage', [
    lambda n: np.random.default_rng(1).integers(0, 256, n * 4, dtype=np.uint8).tobytes(),  # garbage
    lambda n: np.full(n, np.nan, '<f4').tobytes(),                                          # NaN rows
])
def test_a_damaged_cache_fails_its_checksum_and_is_rebuilt_once(tmp_path, capsys, damage):
    path = _csv(tmp_path)
    first = higgs.load_local('train', path)
    cache = rowcache.cache_path(path)
    size = os.path.getsize(cache)
    _damage_rows(cache, 1000, 500, damage)          # 500 rows, same size: the header still looks right
    assert os.path.getsize(cache) == size and rowcache.row_count(cache, 29) == 3000
    with pytest.raises(rowcache.ChecksumError):
        rowcache.read_rows(cache, 29, slice(0, 10))  # even rows far from the damage are not trusted
    capsys.readouterr()

    again = higgs.load_local('train[:100]', path)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"fastcore: the HIGGS row cache {cache!r} failed its checksum; rebuilding it from {path!r}"]
    np.testing.assert_array_equal(again.x, first.x[:100])
    whole = higgs.load_local('train', path)          # rebuilt: the damaged rows are right again
    assert capsys.readouterr().err == ''
    np.testing.assert_array_equal(whole.x, first.x)
    np.testing.assert_array_equal(whole.y, first.y)


def test_the_cache_header_carries_the_payload_crc(tmp_path):
    path = _csv(tmp_path, n=10)
    higgs.load_local('train', path)
    cache = rowcache.cache_path(path)
    raw = open(cache, 'rb').read()
    magic, version, cols, rows, crc = rowcache._HEADER.unpack(raw[:rowcache._HEADER.size])
    assert (magic, version, cols, rows) == (rowcache.MAGIC, 2, 29, 10)
    import zlib
    assert crc == zlib.crc32(raw[rowcache._HEADER.size:]) != 0


# ---- one builder at a time ------------------------------------------------

_BUILDER = textwrap.dedent('''
    import os, sys, time
    import numpy as np
    from pipelines import higgs
    csv, log, mode = sys.argv[1:4]
    real = higgs.iter_rows

    def counted(*args):
        with open(log, 'a') as f:
            f.write(f'{os.getpid()} {time.time()}\\n')
        for i, block in enumerate(real(*args)):
            yield block
            if mode == 'hang':
                open(log + '.started', 'w').close()
                time.sleep(60)
            time.sleep(0.5)          # a slow parse: the other process must wait for it

    higgs.iter_rows = counted
    data = higgs.load_local('train', csv)
    print(time.time(), float(np.asarray(data.x, np.float64).sum()), len(data))
''')


def _builder(csv, log, mode, cache_dir):
    env = dict(os.environ, FASTCORE_CACHE_DIR=cache_dir, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, '-c', _BUILDER, csv, log, mode], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_building_the_same_cache_parse_once(tmp_path):
    csv = _write(tmp_path / 'HIGGS.csv.gz', _values(40000))
    log = str(tmp_path / 'parses.log')
    cache_dir = str(tmp_path / 'cache')
    procs = [_builder(csv, log, 'slow', cache_dir) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    parses = open(log).read().splitlines()
    assert len(parses) == 1, parses                          # one parsed, the other waited
    results = [out.split() for out, _ in outs]
    assert results[0][1:] == results[1][1:] and results[0][2] == '40000'
    waited = [err for _, err in outs if 'waiting for another process building' in err]
    assert len(waited) == 1, outs
    parse_started = float(parses[0].split()[1])
    assert min(float(r[0]) for r in results) > parse_started  # nobody finished before the parse
    cache = rowcache.cache_path(csv)
    assert rowcache.row_count(cache, 29) == 40000
    assert rowcache.read_rows(cache, 29, slice(0, 40000)).shape == (40000, 29)
    assert sorted(os.listdir(cache_dir)) == [os.path.basename(cache)]   # no lock, no temp left


def test_a_killed_builder_leaves_no_stuck_lock(tmp_path):
    csv = _csv(tmp_path, n=20000)
    log = str(tmp_path / 'parses.log')
    cache_dir = tmp_path / 'cache'
    proc = _builder(csv, log, 'hang', str(cache_dir))
    deadline = time.monotonic() + 30
    while not os.path.exists(log + '.started'):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    left = sorted(os.listdir(cache_dir))
    assert any(n.endswith('.lock') for n in left) and any(n.endswith('.tmp') for n in left), left
    lock = os.path.join(cache_dir, next(n for n in left if n.endswith('.lock')))
    with open(lock) as f:                    # the kernel dropped the dead builder's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    start = time.monotonic()
    data = higgs.load_local('train', csv)
    assert len(data) == 20000 and time.monotonic() - start < 10
    assert sorted(os.listdir(cache_dir)) == [os.path.basename(rowcache.cache_path(csv))]


# ---- a cache folder that cannot be written --------------------------------

def test_a_cache_dir_that_is_a_file(tmp_path, monkeypatch):
    path = _csv(tmp_path, n=5)
    (tmp_path / 'not-a-folder').write_text('x')
    monkeypatch.setenv('FASTCORE_CACHE_DIR', str(tmp_path / 'not-a-folder'))
    with pytest.raises(DataError) as e:
        higgs.load_local('train', path)
    assert f"{str(tmp_path / 'not-a-folder')!r} is a file, not a folder" in str(e.value)
    assert 'FASTCORE_CACHE_DIR' in str(e.value) and '\n' not in str(e.value)


def test_a_read_only_cache_dir(tmp_path, monkeypatch):
    path = _csv(tmp_path, n=5)
    folder = tmp_path / 'cache'
    folder.mkdir()
    real_open = os.open

    def read_only(name, flags, *args, **kw):   # root ignores chmod: fail the way a read-only mount does
        if str(name).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
        return real_open(name, flags, *args, **kw)

    monkeypatch.setattr(os, 'open', read_only)
    with pytest.raises(DataError) as e:
        higgs.load_local('train', path)
    assert str(e.value) == (f'cannot write the data cache in {str(folder)!r} (Read-only file system): '
                            f'set FASTCORE_CACHE_DIR to a writable folder')
    assert os.listdir(folder) == []


def test_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    path = _csv(tmp_path, n=3000)
    folder = tmp_path / 'cache'
    written = []

    def full(fd, data):                       # the disk fills after 100 kB
        if sum(written) + len(data) > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        return real_write(fd, data)

    real_write = os.write
    monkeypatch.setattr(os, 'write', full)
    with pytest.raises(DataError) as e:
        higgs.load_local('train', path)
    monkeypatch.undo()
    assert written, 'the cache was never written'
    assert str(e.value).startswith(f'no space left in {str(folder)!r} for the data cache')
    assert 'FASTCORE_CACHE_DIR' in str(e.value)
    assert os.listdir(folder) == []


def test_paths_in_messages_are_quoted_so_a_trailing_space_shows(tmp_path):
    path = tmp_path / 'HIGGS.csv '
    path.write_text('1,' + ','.join(['0.5'] * 28) + '\n1,2,3\n')
    with pytest.raises(DataError, match=r"HIGGS\.csv ': line 2 has 3 fields, expected 29$"):
        higgs.load_local('train', str(path))


# ---- the parser -----------------------------------------------------------

ROW = ','.join(['1'] + ['0.5'] * 28)


@pytest.mark.parametrize('bad, message', [
    (','.join(['1'] + ['0.5'] * 27), 'line {n} has 28 fields, expected 29'),
    (ROW + ',0.5', 'line {n} has 30 fields, expected 29'),
    (ROW.replace('0.5', 'abc', 1), "line {n} has a non-numeric field: '1,abc,0.5"),
    (ROW.replace('0.5', '', 1), "line {n} has a non-numeric field: '1,,0.5"),
    ('2' + ROW[1:], 'line {n} has label 2, expected one of [0.0, 1.0]'),
    ('nan' + ROW[1:], 'line {n} has label nan'),
    (ROW[:-3] + 'nan', 'line {n} has a NaN or infinite value'),
    (ROW.replace('0.5', '-inf', 1), 'line {n} has a NaN or infinite value'),
])
@pytest.mark.parametrize('where', [2, 4998, 9999])
def test_a_bad_row_is_named_by_its_line_across_chunks(tmp_path, monkeypatch, bad, message, where):
    monkeypatch.setattr(csvrows, '_CHUNK', 1 << 16)      # many chunks: numbering must carry over
    lines = [ROW] * 10000
    lines[100] = lines[5000] = ''                        # empty lines count as lines, hold no row
    lines[where - 1] = bad
    path = tmp_path / 'bad.csv.gz'
    path.write_bytes(gzip.compress(('\n'.join(lines) + '\n').encode()))
    with pytest.raises(DataError) as e:
        _parse_all(str(path))
    assert str(e.value).startswith(f'{str(path)!r}: ' + message.format(n=where)), str(e.value)


def test_gzip_damage_keeps_its_messages(tmp_path):
    good = gzip.compress((ROW + '\n').encode() * 3000)
    cut = tmp_path / 'cut.csv.gz'
    cut.write_bytes(good[:-30])
    with pytest.raises(DataError, match=r"cut\.csv\.gz': gzip stream is truncated; re-download it"):
        _parse_all(str(cut))
    corrupt = tmp_path / 'corrupt.csv.gz'
    corrupt.write_bytes(good[:10] + bytes(200) + good[210:])
    with pytest.raises(DataError, match=r"corrupt\.csv\.gz': corrupt gzip data \(.*\); re-download it"):
        _parse_all(str(corrupt))
    not_gzip = tmp_path / 'text.csv.gz'
    not_gzip.write_bytes(b'1,2,3')
    with pytest.raises(DataError, match=r"text\.csv\.gz': corrupt gzip data \(no gzip header\); re-download it"):
        _parse_all(str(not_gzip))
    both = tmp_path / 'two-members.csv.gz'                # `cat a.gz b.gz` is one valid file
    both.write_bytes(good + gzip.compress(b'0' + ROW[1:].encode() + b'\n'))
    assert _parse_all(str(both))[:, 0].sum() == 3000 and len(_parse_all(str(both))) == 3001


@pytest.mark.skipif(not os.path.exists(SAMPLE), reason='shared HIGGS sample not found')
def test_the_sample_parses_bit_for_bit_as_before(monkeypatch):
    monkeypatch.setattr(csvrows, '_CHUNK', 1 << 18)      # many chunks, to cover the joins
    with gzip.open(SAMPLE) as f:
        old = np.loadtxt(f, **OLD_PARSER)
    new = _parse_all(SAMPLE)
    assert new.shape == old.shape == (10984, 29)
    np.testing.assert_array_equal(_bits(new), _bits(old))


def _just_past_midpoints(n=64):
    """'%.18e' decimals a hair past the midpoint between a float32 x (even last bit) and the next one up.

    Rounded to float64 first (as np.loadtxt does), they land exactly on the midpoint and tie to x;
    rounded straight to float32 they go up. The cache must keep the old values.
    """
    rng = np.random.default_rng(7)
    x = rng.normal(0, 2, n).astype(np.float32)
    x = (x.view(np.uint32) & ~np.uint32(1)).view(np.float32)                # last bit even: ties go to x
    mid = (x.astype(np.float64) + np.nextafter(x, np.float32(np.inf) * np.sign(x)).astype(np.float64)) / 2
    away = decimal.Context(prec=19, rounding=decimal.ROUND_UP)             # 19 digits, as '%.18e' has
    texts = [format(away.plus(decimal.Decimal(float(m))), '.18e') for m in mid]
    return x, mid, texts


@pytest.mark.skipif(not os.path.exists(SAMPLE), reason='shared HIGGS sample not found')
def test_the_uci_long_format_parses_bit_for_bit_as_before(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    monkeypatch.setattr(csvrows, '_CHUNK', 1 << 18)
    with gzip.open(SAMPLE) as f:
        values = np.loadtxt(f, delimiter=',', dtype=np.float64)
    lines = [','.join('%.18e' % v for v in row) for row in values]
    x, mid, texts = _just_past_midpoints(28 * 4)
    tricky = [t for t, m in zip(texts, mid) if float(t) == m]                # still the midpoint in float64
    assert len(tricky) == 28 * 4
    lines += [','.join(['1.000000000000000000e+00'] + tricky[i:i + 28]) for i in range(0, len(tricky) - 27, 28)]
    path = tmp_path / 'HIGGS.csv.gz'
    path.write_bytes(gzip.compress(('\n'.join(lines) + '\n').encode(), compresslevel=1))
    old = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), **OLD_PARSER)
    new = _parse_all(str(path))
    assert new.shape == (10984 + len(tricky) // 28, 29)
    np.testing.assert_array_equal(_bits(new), _bits(old))
    # the tricky rows do tell the two roundings apart: a direct float32 parse would have failed above
    direct = pcsv.read_csv(pa.py_buffer('\n'.join(tricky).encode()),
                           read_options=pcsv.ReadOptions(column_names=['v']),
                           convert_options=pcsv.ConvertOptions(column_types={'v': pa.float32()}))
    direct = direct['v'].to_numpy()[:len(tricky) // 28 * 28]
    assert (_bits(direct) != _bits(new[10984:, 1:].ravel())).all()


def test_plain_and_gzip_files_parse_the_same(tmp_path):
    data = _values(2000, seed=3)
    plain = _parse_all(_write(tmp_path / 'a.csv', data, fmt='%.18e', gz=False))
    packed = _parse_all(_write(tmp_path / 'a.csv.gz', data, fmt='%.18e'))
    np.testing.assert_array_equal(_bits(plain), _bits(packed))
    np.testing.assert_array_equal(_bits(plain), _bits(data.astype(np.float32)))


# ---- progress -------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self):
        return True


def _progress_run(tmp_path, monkeypatch, stream):
    monkeypatch.setattr(csvrows, '_CHUNK', 1 << 16)
    path = _csv(tmp_path, n=3000)
    shown = Progress('fastcore: reading HIGGS.csv.gz', os.path.getsize(path), stream=stream)
    rows = sum(len(b) for b in csvrows.iter_rows(path, 29, (0.0, 1.0), shown))
    return rows, stream.getvalue()


def test_progress_lines_when_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, 'QUIET_FOR', 0.0)
    monkeypatch.setattr(progress, 'NON_TTY_INTERVAL', 0.0)
    rows, out = _progress_run(tmp_path, monkeypatch, io.StringIO())
    lines = out.splitlines()
    assert '\r' not in out and len(lines) >= 3, out
    assert all(line.startswith('fastcore: reading HIGGS.csv.gz: ') for line in lines)
    assert ' rows/s, ' in lines[0] and lines[0].endswith(' left')
    assert lines[-2].startswith('fastcore: reading HIGGS.csv.gz: 3,000 rows, ') and '100%' in lines[-2]
    assert lines[-1].startswith('fastcore: reading HIGGS.csv.gz: 3,000 rows in ') and rows == 3000


def test_progress_redraws_one_line_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, 'QUIET_FOR', 0.0)
    monkeypatch.setattr(progress, 'TTY_INTERVAL', 0.0)
    _, out = _progress_run(tmp_path, monkeypatch, _Tty())
    assert out.count('\r') >= 3 and out.count('\n') == 1 and out.endswith(' rows/s\x1b[K\n')


def test_progress_is_silent_for_small_files(tmp_path, monkeypatch, capsys):
    _, out = _progress_run(tmp_path, monkeypatch, io.StringIO())
    assert out == ''
    higgs.load_local('train', _csv(tmp_path, n=100, name='small.csv.gz'))
    assert capsys.readouterr().err == ''


def test_progress_eta_from_the_share_of_the_file_read():
    now = [0.0]
    out = io.StringIO()
    shown = Progress('x', total=1000, stream=out, clock=lambda: now[0])
    now[0] = 30.0
    shown.update(rows=400_000, done=250)
    assert out.getvalue() == 'x: 400,000 rows, 13,333 rows/s, 25%, 1m30s left\n'


def test_a_failed_read_ends_the_progress_line_before_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, 'QUIET_FOR', 0.0)
    monkeypatch.setattr(progress, 'TTY_INTERVAL', 0.0)
    monkeypatch.setattr(csvrows, '_CHUNK', 1 << 16)
    path = tmp_path / 'bad.csv.gz'
    path.write_bytes(gzip.compress(((ROW + '\n') * 5000 + '1,2,3\n').encode()))
    out = _Tty()
    with pytest.raises(DataError, match='line 5001 has 3 fields'):
        _parse_all_with(str(path), Progress('x', os.path.getsize(path), stream=out))
    assert out.getvalue().count('\r') >= 2 and out.getvalue().endswith('\n') and ' rows in ' not in out.getvalue()


def test_a_failed_cache_write_stops_the_parse_at_once(tmp_path, monkeypatch):
    stopped = []

    def blocks():
        try:
            while True:
                yield np.zeros((1000, 29), np.float32)
        finally:
            stopped.append(True)

    def full(fd, data):                       # room for the header and 3 blocks
        if os.fstat(fd).st_size >= 3 * 116_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    real_write = os.write
    monkeypatch.setattr(os, 'write', full)
    with pytest.raises(DataError, match='no space left') as e:
        rowcache.write_rows(str(tmp_path / 'x.rows'), 29, blocks())
    assert stopped == [True] and os.listdir(tmp_path) == []   # closed, not merely collected with `e`
    assert e.tb is not None


def _parse_all_with(path, shown):
    return np.concatenate(list(csvrows.iter_rows(path, 29, (0.0, 1.0), shown)))


def test_a_bad_line_before_a_truncation_is_named_first(tmp_path, monkeypatch):
    monkeypatch.setattr(csvrows, '_CHUNK', 1 << 16)
    text = ((ROW + '\n') * 5000 + '1,2\n' + (ROW + '\n') * 1100).encode()   # in the last chunk handed out
    path = tmp_path / 'cut.csv.gz'
    path.write_bytes(gzip.compress(text)[:-20])
    real = csvrows._row_major
    monkeypatch.setattr(csvrows, '_row_major', lambda *a: time.sleep(0.05) or real(*a))  # parse lags
    with pytest.raises(DataError, match='line 5001 has 2 fields'):
        _parse_all(str(path))
