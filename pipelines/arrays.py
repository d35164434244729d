"""The in-memory form every loader returns and every stream consumes."""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Arrays:
    """One split: x float32 [N, ...]; y int32 class ids or float32 targets, [N] or [N, 1].

    `source` says where the rows came from ('tfds:mnist train[:8000]',
    '/data/mnist/t10k-images-idx3-ubyte.gz test[8000:]') for logs and errors.
    """
    x: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.x)
