"""Dataset name -> loader, and where its rows come from (local folder or tfds)."""
import os

from pipelines import higgs, mnist, synthetic
from pipelines.arrays import Arrays
from pipelines.errors import DataError
from pipelines.splits import split_name

DATASETS = ('line', 'sine', 'mnist', 'fashion_mnist', 'higgs')
FILE_DATASETS = ('mnist', 'fashion_mnist', 'higgs')   # read from a folder, else from tfds; the others are generated


def load(dataset: str, split: str, data_dir: str | None = None, seed: int = 0) -> Arrays:
    """Rows `split` of `dataset`: from `data_dir` (else FASTCORE_DATA_DIR), else tfds.

    `seed` only drives the generated data sets; file and tfds rows are fixed.
    """
    if dataset not in DATASETS:
        raise DataError(f'unknown dataset {dataset!r}: choose one of {", ".join(DATASETS)}')
    split_name(split)  # bad syntax fails here, before any file or network access
    if dataset == 'line':
        return synthetic.load_line(split, seed)
    if dataset == 'sine':
        return synthetic.load_sine(split, seed)
    data_dir = data_dir or os.environ.get('FASTCORE_DATA_DIR') or None
    if data_dir is not None and not os.path.exists(data_dir):
        raise DataError(f'data dir {data_dir!r} does not exist: fix --data-dir or FASTCORE_DATA_DIR')
    if dataset == 'higgs':
        return higgs.load_tfds(split) if data_dir is None else higgs.load_local(split, data_dir)
    if data_dir is None:
        return mnist.load_tfds(dataset, split)
    return mnist.load_local(dataset, split, mnist.folder_for(dataset, data_dir))
