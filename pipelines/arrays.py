"""The in-memory form every loader returns and every stream consumes."""
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Arrays:
    """One split: x float32 [N, ...]; y int32 class ids or float32 targets, [N] or [N, 1].

    x and y may also be dicts or lists of such arrays (a model with several inputs or outputs), and
    `sample_weight` an [N] array (or one per output) that the streams carry beside y.
    `source` says where the rows came from ('tfds:mnist train[:8000]',
    '/data/mnist/t10k-images-idx3-ubyte.gz test[8000:]') for logs and errors.
    """
    x: Any
    y: Any
    source: str
    sample_weight: Any = None

    def __len__(self) -> int:
        return len(_first_leaf(self.x))

    @property
    def columns(self) -> tuple:
        """What each batch holds: (x, y) or (x, y, sample_weight)."""
        return (self.x, self.y) if self.sample_weight is None else (self.x, self.y, self.sample_weight)


def _first_leaf(value) -> np.ndarray:
    if isinstance(value, dict):
        return _first_leaf(value[sorted(value)[0]])
    if isinstance(value, (list, tuple)):
        return _first_leaf(value[0])
    return value
