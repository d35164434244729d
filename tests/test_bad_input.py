"""Bad input, case by case: one clear line on stderr, exit code 2, no traceback, nothing half-written."""
import gzip
import os
import struct

import pytest

import pipelines
from fastcore.train import run_cli
from pipelines import higgs, rowcache

GOOD_ROW = "1," + ",".join(["0.5"] * 28)


def higgs_dir(tmp, text=None, raw=None, name="HIGGS.csv.gz"):
    folder = tmp / "data" / "higgs"
    folder.mkdir(parents=True)
    path = folder / name
    if raw is not None:
        path.write_bytes(raw)
    elif name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return tmp / "data"


def gz_bytes(text):
    return gzip.compress(text.encode())


def idx(magic, dims, payload_size=None):
    count = 1
    for d in dims:
        count *= d
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in dims)
    return header + bytes(count if payload_size is None else payload_size)


def mnist_dir(tmp, images=None, labels=None):
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images if images is not None else idx(2051, [10, 28, 28])))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels if labels is not None else idx(2049, [10])))
    return tmp / "data"


HIGGS = ["--dataset", "higgs"]
MNIST_TEST = ["--dataset", "mnist", "--train-split", "test[:8]", "--eval-split", "test[8:]"]

CASES = {   # name: (how to make the data dir (or None), extra args, text the one line must hold)
    "unknown dataset": (None, ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    "missing data dir": (lambda t: t / "nowhere", HIGGS, "does not exist"),
    "data dir without HIGGS": (lambda t: (t / "empty").mkdir() or t / "empty", HIGGS, "no HIGGS data"),
    "CSV wrong column count": (lambda t: higgs_dir(t, GOOD_ROW + "\n1,2,3\n"), HIGGS, "line 2 has 3 fields, expected 29"),
    "CSV non-numeric field": (lambda t: higgs_dir(t, GOOD_ROW + "\n" + GOOD_ROW + "\n" + GOOD_ROW.replace("0.5", "abc", 1) + "\n"),
                              HIGGS, "line 3 has a non-numeric field"),
    "CSV bad label": (lambda t: higgs_dir(t, "7" + GOOD_ROW[1:] + "\n"), HIGGS, "line 1 has label 7"),
    "CSV empty file": (lambda t: higgs_dir(t, ""), HIGGS, "no data rows"),
    "CSV truncated gzip": (lambda t: higgs_dir(t, raw=gz_bytes((GOOD_ROW + "\n") * 2000)[:-30]), HIGGS, "truncated"),
    "CSV corrupt gzip": (lambda t: higgs_dir(t, raw=b"\x1f\x8b\x08\x00" + os.urandom(200)), HIGGS, "corrupt gzip"),
    "CSV not gzip at all": (lambda t: higgs_dir(t, raw=b"this is not gzip"), HIGGS, "HIGGS.csv.gz"),
    "IDX wrong magic": (lambda t: mnist_dir(t, images=idx(2049, [10, 28, 28])), MNIST_TEST, "IDX magic 2049, expected 2051"),
    "IDX size mismatch": (lambda t: mnist_dir(t, images=idx(2051, [10, 28, 28], payload_size=100)), MNIST_TEST, "needs"),
    "IDX empty file": (lambda t: mnist_dir(t, images=b""), MNIST_TEST, "empty"),
    "IDX image/label counts differ": (lambda t: mnist_dir(t, labels=idx(2049, [9])), MNIST_TEST, "has 10 images but"),
    "MNIST train split absent locally": (lambda t: mnist_dir(t), ["--dataset", "mnist"], "--train-split test[:8000]"),
    "bad split syntax": (None, ["--dataset", "line", "--train-split", "train[abc]"], "bad split 'train[abc]'"),
    "empty split": (None, ["--dataset", "line", "--train-split", "train[500:500]"], "selects no examples"),
    "higgs has no test split": (lambda t: higgs_dir(t, GOOD_ROW + "\n"), HIGGS + ["--eval-split", "test"], "only the 'train' split"),
    "zero epochs": (None, ["--dataset", "line", "--epochs", "0"], "--epochs 0 must be positive"),
    "non-integer epochs": (None, ["--dataset", "line", "--epochs", "two"], "invalid int value: 'two'"),
    "negative learning rate": (None, ["--dataset", "line", "--learning-rate", "-0.1"], "--learning-rate -0.1 must be positive"),
    "dropout out of range": (None, ["--dataset", "line", "--dropout", "1.0"], "--dropout 1.0 is outside [0, 1)"),
    "negative l2": (None, ["--dataset", "line", "--l2", "-1"], "--l2 -1.0 is negative"),
    "batch larger than data": (None, ["--dataset", "line", "--batch-size", "5000"], "larger than the 1000 training examples"),
    "zero steps per call": (None, ["--dataset", "line", "--steps-per-call", "0"], "--steps-per-call 0 must be positive"),
    "negative verify": (None, ["--dataset", "line", "--verify", "-3"], "--verify -3"),
    "conflicting compile modes": (None, ["--dataset", "line", "--no-xla", "--eager"], "not allowed with argument"),
    "unknown precision": (None, ["--dataset", "line", "--precision", "int8"], "invalid choice: 'int8'"),
    "unknown model api": (None, ["--dataset", "line", "--model-api", "torch"], "invalid choice: 'torch'"),
    "logdir is a file": (None, ["--dataset", "line", "--logdir", "LOGFILE/runs"], "is a file, not a folder"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, capsys, monkeypatch):
    make_data, args, expected = CASES[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "LOGFILE").write_text("a file where a folder should be")
    data = make_data(tmp_path) if make_data else None
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cache = os.environ["FASTCORE_CACHE_DIR"]
    cache_before = set(os.listdir(cache)) if os.path.isdir(cache) else set()
    code = run_cli([*args, *(["--data-dir", str(data)] if data else []), "--logdir", str(tmp_path / "runs")]
                   if "--logdir" not in args else [*args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and expected in err[0], err
    assert "Traceback" not in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before   # nothing written
    for new in (set(os.listdir(cache)) if os.path.isdir(cache) else set()) - cache_before:
        # only a complete cache may appear (a valid train split parsed before the eval split failed)
        assert rowcache.row_count(os.path.join(cache, new), 29) is not None, f"half-written {new}"


def test_a_cache_of_an_older_format_is_rebuilt_not_trusted(data_dir):
    source = os.path.join(data_dir, "higgs")
    first = pipelines.load("higgs", "train[:100]", source)
    cache_file = rowcache.cache_path(higgs.find_csv(source))
    with open(cache_file, "r+b") as f:   # pretend an older version wrote it
        header = bytearray(f.read(64))
        f.seek(0)
        f.write(bytes(header).replace(struct.pack("<I", rowcache.VERSION), struct.pack("<I", rowcache.VERSION - 1), 1))
    again = pipelines.load("higgs", "train[:100]", source)
    assert (again.x == first.x).all() and (again.y == first.y).all()
    with open(cache_file, "rb") as f:   # re-parsed and rewritten in the current format
        assert rowcache._HEADER.unpack(f.read(rowcache._HEADER.size))[1] == rowcache.VERSION
