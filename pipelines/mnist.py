"""MNIST and Fashion-MNIST: local IDX files when given a folder, tfds otherwise."""
import os

import numpy as np

from pipelines.arrays import Arrays
from pipelines.errors import DataError
from pipelines.idx import IMAGES_MAGIC, LABELS_MAGIC, find_file, read_idx
from pipelines.online import tfds_numpy
from pipelines.splits import parse_split, split_name

PREFIX = {'train': 'train', 'test': 't10k'}
FILES_HINT = ('train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
              't10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz')


def has_files(folder: str) -> bool:
    """Whether `folder` holds any MNIST-layout IDX file."""
    return any(find_file(folder, f'{p}-{kind}') for p in PREFIX.values()
               for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'))


def load_local(name: str, spec: str, folder: str) -> Arrays:
    """Rows `spec` of the IDX files in `folder`."""
    split = split_name(spec)
    if split not in PREFIX:
        raise DataError(f"{name} has splits 'train' and 'test', not {split!r}")
    images_path = find_file(folder, f'{PREFIX[split]}-images-idx3-ubyte')
    labels_path = find_file(folder, f'{PREFIX[split]}-labels-idx1-ubyte')
    if images_path is None or labels_path is None:
        raise DataError(_missing_message(name, split, folder))
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f'{images_path!r} has {len(images)} images but {labels_path!r} has '
                        f'{len(labels)} labels; re-download them')
    rows = parse_split(spec, len(images))
    return _arrays(images[rows], labels[rows], f'{images_path} {spec}')


def load_tfds(name: str, spec: str) -> Arrays:
    """Rows `spec` of tfds' `name`."""
    images, labels = tfds_numpy(name, spec, FILES_HINT, supervised=True)
    return _arrays(images, labels, f'tfds:{name} {spec}')


def _arrays(images: np.ndarray, labels: np.ndarray, source: str) -> Arrays:
    """Pixels scaled to [0, 1] and flattened: the MLP tasks' input."""
    if labels.size and labels.max() > 9:
        raise DataError(f'{source}: label {labels.max()} outside 0..9; re-download the labels file')
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
    return Arrays(x=x, y=labels.astype(np.int32), source=source)


def _missing_message(name: str, split: str, folder: str) -> str:
    other = 'test' if split == 'train' else 'train'
    stem = f'{PREFIX[split]}-images-idx3-ubyte.gz'
    if find_file(folder, f'{PREFIX[other]}-images-idx3-ubyte'):
        return (f"{folder!r} has no {split} files for {name} ({stem} and labels), only '{other}': "
                f'use --train-split {other}[:8000] --eval-split {other}[8000:]')
    return f'{folder!r} has no {name} files: expected {FILES_HINT}'


def folder_for(name: str, data_dir: str) -> str:
    """The dataset folder: `data_dir` itself or its `mnist/`, `fashion-mnist/` child."""
    if has_files(data_dir):
        return data_dir
    children = {'mnist': ['mnist'], 'fashion_mnist': ['fashion-mnist', 'fashion_mnist']}[name]
    for child in children:
        path = os.path.join(data_dir, child)
        if os.path.isdir(path):
            return path
    raise DataError(f'no {name} data in {data_dir!r}: expected {os.path.join(data_dir, children[0], "")!r} '
                    f'or a folder holding {FILES_HINT}')
