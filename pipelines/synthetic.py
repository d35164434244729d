"""The tutorial data sets, generated from a seed: nothing to download."""
import numpy as np

from pipelines.arrays import Arrays
from pipelines.errors import DataError
from pipelines.splits import parse_split, split_name

ROWS = 1000
_STREAM = {'train': 0, 'test': 1}  # independent random streams per split


def load_line(spec: str, seed: int = 0) -> Arrays:
    """y = 3x + 2 + N(0, 1) with x ~ U(-3, 3).

    The wide x range pins the slope (standard error 0.018); the intercept's is
    1/sqrt(1000) = 0.032 whatever the range. Least squares on seed 0 lands
    within 0.012 of W=3, b=2.
    """
    rng = _rng('line', spec, seed)
    x = rng.uniform(-3.0, 3.0, (ROWS, 1))
    y = 3.0 * x + 2.0 + rng.standard_normal((ROWS, 1))
    return _arrays('line', spec, seed, x, y)


def load_sine(spec: str, seed: int = 0) -> Arrays:
    """y = sin(x): 'train' evenly spaced on [0, 2*pi], 'test' at seeded random points."""
    if split_name(spec) == 'train':
        x = np.linspace(0.0, 2.0 * np.pi, ROWS).reshape(-1, 1)
    else:
        x = _rng('sine', spec, seed).uniform(0.0, 2.0 * np.pi, (ROWS, 1))
    return _arrays('sine', spec, seed, x, np.sin(x))


def _rng(name: str, spec: str, seed: int) -> np.random.Generator:
    split = split_name(spec)
    if split not in _STREAM:
        raise DataError(f"{name} has splits 'train' and 'test', not {split!r}")
    return np.random.default_rng([seed, _STREAM[split]])


def _arrays(name, spec, seed, x, y) -> Arrays:
    rows = parse_split(spec, ROWS)
    return Arrays(x=x[rows].astype(np.float32), y=y[rows].astype(np.float32),
                  source=f'synthetic:{name}(seed={seed}) {spec}')
