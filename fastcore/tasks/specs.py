"""What a model is, as plain data: read by the CLI and the task registry without importing TensorFlow."""
from __future__ import annotations

import dataclasses

MODEL_APIS = ("keras-sequential", "keras-functional", "keras-subclass", "module")


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A multilayer perceptron: inputs -> hidden layers (activation) -> outputs (linear: logits or values)."""
    inputs: int
    hidden: tuple[int, ...]
    activation: str = "relu"          # relu | elu
    outputs: int = 1
    initial_kernel: float | None = None   # constant start (the `line` tutorial starts from W=5, b=0)

    def training_flops_per_example(self) -> int:
        """The textbook estimate, 6 x the multiply-adds of the dense layers (2x forward, 4x backward;
        biases, activations, loss and update left out). fastcore measures FLOPs from the graph
        (fastcore.observe.flops); this formula is the yardstick the tests hold that count to."""
        sizes = (self.inputs, *self.hidden, self.outputs)
        return 6 * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))


@dataclasses.dataclass(frozen=True)
class Regularization:
    l2: float = 0.0
    dropout: float = 0.0
