"""HIGGS: the UCI CSV (label, then 28 features) via a binary row cache, or tfds."""
import glob
import os
import sys

import numpy as np

from pipelines import rowcache
from pipelines.arrays import Arrays
from pipelines.csvrows import iter_rows
from pipelines.errors import DataError
from pipelines.online import tfds_numpy
from pipelines.progress import Progress
from pipelines.splits import parse_split, split_name

# UCI column order after the label; tfds stores the same columns by name.
FEATURES = (
    'lepton_pT', 'lepton_eta', 'lepton_phi', 'missing_energy_magnitude', 'missing_energy_phi',
    'jet_1_pt', 'jet_1_eta', 'jet_1_phi', 'jet_1_b-tag',
    'jet_2_pt', 'jet_2_eta', 'jet_2_phi', 'jet_2_b-tag',
    'jet_3_pt', 'jet_3_eta', 'jet_3_phi', 'jet_3_b-tag',
    'jet_4_pt', 'jet_4_eta', 'jet_4_phi', 'jet_4_b-tag',
    'm_jj', 'm_jjj', 'm_lv', 'm_jlv', 'm_bb', 'm_wbb', 'm_wwbb',
)
COLUMNS = 1 + len(FEATURES)
KNOWN_NAMES = ('HIGGS.csv.gz', 'HIGGS.csv', 'HIGGS-sample.csv.gz', 'HIGGS-sample.csv')
LAYOUT = '(UCI layout: label, then 28 features)'
FILES_HINT = f'HIGGS.csv.gz {LAYOUT}'


def load_local(spec: str, data_dir: str) -> Arrays:
    """Rows `spec` of the CSV found from `data_dir`, parsed once into the checksummed cache."""
    _check_split(spec)
    source = find_csv(data_dir)
    cache = rowcache.cache_path(source)

    def parse():
        progress = Progress(f'fastcore: reading {os.path.basename(source)}', os.path.getsize(source))
        return iter_rows(source, COLUMNS, (0.0, 1.0), progress)

    total = rowcache.row_count(cache, COLUMNS)
    if total is None:
        total = rowcache.build(cache, COLUMNS, parse)
    try:
        data = rowcache.read_rows(cache, COLUMNS, parse_split(spec, total))
    except rowcache.ChecksumError as bad:
        print(f'fastcore: the HIGGS row cache {cache!r} failed its checksum; rebuilding it from {source!r}',
              file=sys.stderr)
        total = rowcache.build(cache, COLUMNS, parse, bad=bad.identity)
        try:
            data = rowcache.read_rows(cache, COLUMNS, parse_split(spec, total))
        except rowcache.ChecksumError:
            raise DataError(f'the HIGGS row cache {cache!r} failed its checksum again right after a '
                            f'rebuild: check that disk, or set FASTCORE_CACHE_DIR to another folder') from None
    return Arrays(x=np.ascontiguousarray(data[:, 1:]), y=np.ascontiguousarray(data[:, :1]),
                  source=f'{source} {spec}')


def load_tfds(spec: str) -> Arrays:
    """Rows `spec` of tfds' higgs, columns in UCI order."""
    _check_split(spec)
    features = tfds_numpy('higgs', spec, FILES_HINT, supervised=False)
    x = np.stack([features[name] for name in FEATURES], axis=1).astype(np.float32)
    y = features['class_label'].astype(np.float32).reshape(-1, 1)
    return Arrays(x=x, y=y, source=f'tfds:higgs {spec}')


def find_csv(data_dir: str) -> str:
    """The CSV file: `data_dir` itself, or the one CSV in it or in its `higgs/` child."""
    if os.path.isfile(data_dir):
        return data_dir
    folders = [d for d in (data_dir, os.path.join(data_dir, 'higgs')) if os.path.isdir(d)]
    for folder in folders:
        for name in KNOWN_NAMES:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        found = sorted(glob.glob(os.path.join(folder, '*.csv')) +
                       glob.glob(os.path.join(folder, '*.csv.gz')))
        if len(found) == 1:
            return found[0]
        if found:
            raise DataError(f'{folder!r} holds {len(found)} CSV files; point --data-dir at the HIGGS one')
    raise DataError(f'no HIGGS data in {data_dir!r}: expected {os.path.join(data_dir, "higgs", "HIGGS.csv.gz")!r} '
                    f'{LAYOUT}, or point --data-dir at the file')


def _check_split(spec: str) -> None:
    if split_name(spec) != 'train':
        raise DataError("higgs has only the 'train' split; hold out its end for evaluation, "
                        "e.g. --train-split 'train[:-500000]' --eval-split 'train[-500000:]'")
