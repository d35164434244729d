"""pipelines: split parsing, local readers, the HIGGS cache, streams and the tfds path."""
import gzip
import os
import socket
import struct
import time

import numpy as np
import pytest

from pipelines import DATASETS, Arrays, DataError, eval_stream, load, parse_split, train_stream
from pipelines import higgs, online, rowcache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get('FASTCORE_DATA_DIR') or os.path.join(REPO, '..', 'shared', 'data')
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, 'higgs')),
                                reason=f'shared data not found at {DATA}')


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """Each test gets its own cache folder and no data dir from the environment."""
    monkeypatch.setenv('FASTCORE_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv('FASTCORE_DATA_DIR', raising=False)


# ---- split parsing -------------------------------------------------------

@pytest.mark.parametrize('spec, n, rows', [
    ('train', 60000, (0, 60000)),
    ('test[8000:]', 10000, (8000, 10000)),
    ('test[:8000]', 10000, (0, 8000)),
    ('train[10000:]', 60000, (10000, 60000)),
    ('train[:90%]', 10984, (0, 9886)),            # 9885.6 rounds to closest
    ('train[10%:20%]', 10984, (1098, 2197)),
    ('train[-500000:]', 11000000, (10500000, 11000000)),
    ('train[:-500000]', 11000000, (0, 10500000)),
    ('train[-10%:]', 1000, (900, 1000)),
    ('train[:50%]', 5, (0, 2)),                    # 2.5 rounds half to even, as tfds does
    ('train[:12.5%]', 1000, (0, 125)),
])
def test_parse_split(spec, n, rows):
    assert parse_split(spec, n) == slice(*rows)


@pytest.mark.parametrize('spec, n', [
    ('train[', 10), ('train[1:2:3]', 10), ('train[a:]', 10), ('train[5]', 10), ('train[:]', 10),
    ('train[10:5]', 100), ('train[:0]', 100), ('train[:200%]', 10), ('test[:20000]', 10000),
    ('train[10%:500]', 1000), ('train[1.5:]', 10), ('', 10), ('train test', 10),
])
def test_parse_split_rejects(spec, n):
    with pytest.raises(DataError, match='split'):
        parse_split(spec, n)


# ---- IDX / MNIST family --------------------------------------------------

@needs_data
def test_mnist_from_real_files():
    test = load('mnist', 'test[8000:]', data_dir=DATA)
    assert test.x.shape == (2000, 784) and test.x.dtype == np.float32
    assert test.y.shape == (2000,) and test.y.dtype == np.int32
    assert 0.0 <= test.x.min() and test.x.max() == 1.0
    assert set(np.unique(test.y)) == set(range(10))
    assert 't10k-images' in test.source and 'test[8000:]' in test.source


@needs_data
def test_fashion_mnist_from_its_own_folder():
    train = load('fashion_mnist', 'train[:1000]', data_dir=os.path.join(DATA, 'fashion-mnist'))
    assert train.x.shape == (1000, 784) and train.y.shape == (1000,)


@needs_data
def test_mnist_missing_train_split_gives_the_advice():
    with pytest.raises(DataError, match=r'--train-split test\[:8000\] --eval-split test\[8000:\]'):
        load('mnist', 'train', data_dir=DATA)


def _idx_bytes(magic, dims, data):
    return struct.pack(f'>i{len(dims)}i', magic, *dims) + bytes(data)


def _write_mnist(folder, images, labels, gz=True):
    os.makedirs(folder, exist_ok=True)
    for name, raw in (('t10k-images-idx3-ubyte', images), ('t10k-labels-idx1-ubyte', labels)):
        path = os.path.join(folder, name + ('.gz' if gz else ''))
        with open(path, 'wb') as f:
            f.write(gzip.compress(raw) if gz else raw)


def test_idx_uncompressed_files(tmp_path):
    _write_mnist(tmp_path, _idx_bytes(2051, (3, 28, 28), [255] * 3 * 784),
                 _idx_bytes(2049, (3,), [1, 2, 3]), gz=False)
    got = load('mnist', 'test', data_dir=str(tmp_path))
    assert got.x.shape == (3, 784) and np.all(got.x == 1.0) and list(got.y) == [1, 2, 3]


@pytest.mark.parametrize('images, labels, message', [
    (_idx_bytes(2049, (3, 28, 28), [0] * 3 * 784), _idx_bytes(2049, (3,), [1] * 3), 'magic'),
    (_idx_bytes(2051, (3, 28, 28), [0] * 100), _idx_bytes(2049, (3,), [1] * 3), 'header'),
    (b'', _idx_bytes(2049, (3,), [1] * 3), 'empty'),
    (_idx_bytes(2051, (3, 28, 28), [0] * 3 * 784), _idx_bytes(2049, (2,), [1] * 2), '3 images but'),
])
def test_idx_bad_files(tmp_path, images, labels, message):
    _write_mnist(tmp_path, images, labels)
    with pytest.raises(DataError, match=message):
        load('mnist', 'test', data_dir=str(tmp_path))


def test_idx_truncated_gzip(tmp_path):
    _write_mnist(tmp_path, _idx_bytes(2051, (3, 28, 28), range(3 * 784 % 256)), _idx_bytes(2049, (3,), [1] * 3))
    path = tmp_path / 't10k-images-idx3-ubyte.gz'
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz': unreadable or corrupt"):
        load('mnist', 'test', data_dir=str(tmp_path))


def test_mnist_missing_folder_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match='no mnist data'):
        load('mnist', 'test', data_dir=str(tmp_path))
    with pytest.raises(DataError, match='does not exist'):
        load('mnist', 'test', data_dir=str(tmp_path / 'nope'))
    with pytest.raises(DataError, match='unknown dataset'):
        load('cifar10', 'train')


# ---- HIGGS ---------------------------------------------------------------

@needs_data
def test_higgs_sample_parses_then_reads_the_cache(monkeypatch, tmp_path):
    first = load('higgs', 'train', data_dir=DATA)
    assert first.x.shape == (10984, 28) and first.x.dtype == np.float32
    assert first.y.shape == (10984, 1) and set(np.unique(first.y)) == {0.0, 1.0}
    np.testing.assert_allclose(first.x[0, :3], [0.34186098, -1.313937902, 1.079621911], rtol=1e-6)
    caches = list((tmp_path / 'cache').iterdir())
    assert len(caches) == 1 and caches[0].suffix == '.rows'
    mtime = caches[0].stat().st_mtime_ns

    monkeypatch.setattr(higgs, 'iter_rows', lambda *a: pytest.fail('parsed the CSV again'))
    tail = load('higgs', 'train[-984:]', data_dir=os.path.join(DATA, 'higgs'))
    assert caches[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(tail.x, first.x[-984:])
    np.testing.assert_array_equal(tail.y, first.y[-984:])


def _csv(tmp_path, lines, name='h.csv.gz'):
    text = ''.join(line + '\n' for line in lines).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith('.gz') else text)
    return str(path)


def _row(label='1.000000000000000000e+00', value='0.5', ncols=29):
    return ','.join([label] + [value] * (ncols - 1))


def test_higgs_long_float_format_and_plain_csv(tmp_path):
    path = _csv(tmp_path, [_row(), _row('0', '-2.5e-01')], name='HIGGS.csv')
    got = load('higgs', 'train', data_dir=path)
    assert list(got.y[:, 0]) == [1.0, 0.0] and np.all(got.x[1] == -0.25)


@pytest.mark.parametrize('bad, message', [
    (_row(ncols=28), 'line 3 has 28 fields, expected 29'),
    (_row(value='abc'), 'line 3 has a non-numeric field'),
    (_row(label='2'), 'line 3 has label 2'),
])
def test_higgs_malformed_row_names_its_line(tmp_path, bad, message):
    path = _csv(tmp_path, [_row(), _row(), bad, _row()])
    with pytest.raises(DataError, match=message):
        load('higgs', 'train', data_dir=path)
    assert not os.listdir(tmp_path / 'cache'), 'a temp or partial cache file was left behind'


def test_higgs_empty_and_truncated_files(tmp_path):
    with pytest.raises(DataError, match='empty'):
        load('higgs', 'train', data_dir=_csv(tmp_path, [], name='empty.csv.gz'))
    path = _csv(tmp_path, [_row()] * 2000, name='cut.csv.gz')
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match='truncated'):
        load('higgs', 'train', data_dir=path)


@pytest.mark.parametrize('damage', ['version', 'truncate'])
def test_higgs_stale_or_broken_cache_is_rebuilt(tmp_path, damage):
    path = _csv(tmp_path, [_row(), _row('0')])
    load('higgs', 'train', data_dir=path)
    cache = rowcache.cache_path(path)
    with open(cache, 'r+b') as f:
        if damage == 'version':
            f.seek(8)
            f.write(struct.pack('<I', rowcache.VERSION + 99))
        else:
            f.truncate(os.path.getsize(cache) - 4)
    assert rowcache.row_count(cache, higgs.COLUMNS) is None
    got = load('higgs', 'train', data_dir=path)
    assert list(got.y[:, 0]) == [1.0, 0.0]
    assert rowcache.row_count(cache, higgs.COLUMNS) == 2


def test_higgs_has_only_a_train_split(tmp_path):
    with pytest.raises(DataError, match="only the 'train' split"):
        load('higgs', 'test', data_dir=_csv(tmp_path, [_row()]))


# ---- synthetic -----------------------------------------------------------

def test_line_recovers_its_parameters_and_is_seeded():
    train = load('line', 'train')
    w, b = np.linalg.lstsq(np.hstack([train.x, np.ones_like(train.x)]), train.y, rcond=None)[0][:, 0]
    assert abs(w - 3) < 0.05 and abs(b - 2) < 0.05
    np.testing.assert_array_equal(load('line', 'train', seed=0).x, train.x)
    assert not np.array_equal(load('line', 'test').x, train.x)
    assert not np.array_equal(load('line', 'train', seed=1).x, train.x)
    assert load('line', 'train[:800]').x.shape == (800, 1)


def test_sine():
    train, test = load('sine', 'train'), load('sine', 'test[:100]')
    assert train.x.shape == (1000, 1) and train.x[0, 0] == 0 and np.isclose(train.x[-1, 0], 2 * np.pi)
    np.testing.assert_allclose(train.y, np.sin(train.x), atol=1e-6)
    assert test.x.shape == (100, 1) and np.all((0 <= test.x) & (test.x <= 2 * np.pi))
    assert DATASETS == ('line', 'sine', 'mnist', 'fashion_mnist', 'higgs')


# ---- streams -------------------------------------------------------------

def _ids(n, width=3):
    """Rows that say which example they are: x[i] = i, y[i] = i."""
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], width, axis=1)
    return Arrays(x=x, y=np.arange(n, dtype=np.int32), source='ids')


def _take(ds, k):
    it = iter(ds)
    return [tuple(t.numpy() for t in next(it)) for _ in range(k)]


def test_train_stream_shapes_and_epochs():
    batches = _take(train_stream(_ids(64), 16, seed=3), 12)   # three epochs of four batches
    assert all(x.shape == (16, 3) and y.shape == (16,) for x, y in batches)
    assert all(np.array_equal(x[:, 0], y) for x, y in batches)
    epochs = [np.concatenate([y for _, y in batches[i:i + 4]]) for i in (0, 4, 8)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(64))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_train_stream_is_deterministic_per_seed():
    a, b = _take(train_stream(_ids(50), 8, seed=7), 10), _take(train_stream(_ids(50), 8, seed=7), 10)
    c = _take(train_stream(_ids(50), 8, seed=8), 10)
    assert all(np.array_equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[1], q[1]) for p, q in zip(a, c))


def test_train_stream_stacks_steps_per_call():
    batches = _take(train_stream(_ids(64), 8, seed=0, steps_per_call=4), 4)
    assert all(x.shape == (4, 8, 3) and y.shape == (4, 8) for x, y in batches)
    first_epoch = np.concatenate([y.ravel() for _, y in batches[:2]])
    assert sorted(first_epoch) == list(range(64))


def test_train_stream_rejects_batch_larger_than_data():
    with pytest.raises(DataError, match='batch size 100 is larger than the 64 training examples'):
        train_stream(_ids(64), 100, seed=0)


def test_eval_stream_pads_the_last_batch():
    batches = [tuple(t.numpy() for t in b) for b in eval_stream(_ids(10), 4)]
    assert [x.shape for x, _, _ in batches] == [(4, 3)] * 3
    w = np.concatenate([w for _, _, w in batches])
    y = np.concatenate([y for _, y, _ in batches])
    assert w.dtype == np.float32 and w.sum() == 10 and list(w[10:]) == [0, 0]
    assert list(y[w == 1]) == list(range(10))


def test_deleting_a_used_iterator_is_quick():
    it = iter(train_stream(_ids(4096, width=64), 32, seed=0, steps_per_call=4))
    for _ in range(50):
        next(it)
    import gc
    start = time.perf_counter()
    gc.collect()   # a collection alone: in a long test session's process it can take seconds by itself
    collecting = time.perf_counter() - start
    start = time.perf_counter()
    del it
    gc.collect()
    assert time.perf_counter() - start - collecting < 2.0


# ---- tfds ----------------------------------------------------------------

def test_tfds_path_with_mocked_data(monkeypatch):
    tfds = pytest.importorskip('tensorflow_datasets')
    monkeypatch.setattr(online, '_probe', lambda *a: None)  # mocked tfds needs no network
    with tfds.testing.mock_data(num_examples=20):
        digits = load('mnist', 'train')
        clothes = load('fashion_mnist', 'test')
        events = load('higgs', 'train')
    assert digits.x.shape == (20, 784) and digits.x.dtype == np.float32 and digits.y.dtype == np.int32
    assert 0 <= digits.x.min() and digits.x.max() <= 1 and digits.y.max() <= 9
    assert clothes.source == 'tfds:fashion_mnist test'
    assert events.x.shape == (20, 28) and events.y.shape == (20, 1) and events.x.dtype == np.float32


def test_download_probe_fails_fast_on_an_unreachable_host(monkeypatch):
    for var in ('https_proxy', 'HTTPS_PROXY'):
        monkeypatch.delenv(var, raising=False)

    class Builder:
        url_infos = {'https://host.invalid/HIGGS.csv.gz': None}

    start = time.perf_counter()
    with pytest.raises(DataError, match=r'^advice \[host.invalid: '):
        online._probe(Builder(), 'advice')
    assert time.perf_counter() - start < 5


def _online():
    try:
        socket.create_connection(('storage.googleapis.com', 443), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_online(), reason='network is up: tfds would really download')
def test_tfds_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    tfds = pytest.importorskip('tensorflow_datasets')
    if tfds.builder('fashion_mnist').is_prepared():
        pytest.skip('fashion_mnist is already prepared in the tfds data dir')
    start = time.perf_counter()
    with pytest.raises(DataError, match=r'could not download fashion_mnist with tfds \(no network\?\): '
                                        r'point --data-dir or FASTCORE_DATA_DIR at a folder with '
                                        r'train-images-idx3-ubyte.gz'):
        load('fashion_mnist', 'train')
    assert time.perf_counter() - start < 10


def test_train_stream_iterator_checkpoint_resumes_the_order(tmp_path):
    tf = pytest.importorskip('tensorflow')
    it = iter(train_stream(_ids(64), 8, seed=0))
    for _ in range(3):
        next(it)
    path = tf.train.Checkpoint(it=it).save(str(tmp_path / 'ckpt'))
    expected = [next(it)[1].numpy() for _ in range(10)]
    resumed = iter(train_stream(_ids(64), 8, seed=0))
    tf.train.Checkpoint(it=resumed).restore(path)
    assert all(np.array_equal(next(resumed)[1].numpy(), y) for y in expected)
