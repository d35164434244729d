"""A batch's labels, predictions and sample weights lined up per model output, as Keras' `fit` lines them up.

One output: the labels and the weights as given. Several (a Functional model with a list or dict of outputs):
each output has a name (`model.output_names`, or the keys of the dict the model returns) and takes its labels
from a dict by that name or from a list in output order; sample weights are one array for every output, or a
dict / list per output. Losses and metrics (fastcore.engine.loss_step, fastcore.engine.metrics) then work on flat
lists, one entry per output.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import tensorflow as tf

from fastcore.errors import UsageError


@dataclasses.dataclass
class Outputs:
    names: list[str]              # one per output ("output_1"... when the model names none)
    y_true: list
    y_pred: list
    sample_weight: list | None    # one per output (None entries: unweighted), or None

    def __len__(self) -> int:
        return len(self.y_pred)


def line_up(model, y_true, y_pred, sample_weight=None) -> Outputs:
    """Outputs from one batch's labels, the model's predictions and the sample weights (see the module doc)."""
    names = output_names(model, y_pred)
    if isinstance(y_pred, Mapping):
        preds = [y_pred[name] for name in names]
    elif isinstance(y_pred, (list, tuple)):
        preds = list(y_pred)
    else:
        preds = [y_pred]
    # Losses and metrics in float32 whatever the compute dtype (as Keras computes them under mixed precision).
    preds = [tf.cast(p, tf.float32) if tf.as_dtype(p.dtype).is_floating else p for p in preds]
    trues = labels_per_output(y_true, names)
    weights = None
    if sample_weight is not None:
        is_nested = isinstance(sample_weight, (Mapping, list, tuple))
        weights = _per_output(sample_weight, names, "sample weights", partial=True) if is_nested else [sample_weight] * len(names)
    return Outputs(names, trues, preds, weights)


def labels_per_output(y_true, names: list[str]) -> list:
    """The labels of each output, in `names`' order (as line_up splits them)."""
    return _per_output(y_true, names, "labels")


def output_names(model, y_pred) -> list[str]:
    """The model's output names in output order: the Functional model's own, else the returned dict's keys."""
    own = list(getattr(model, "output_names", None) or [])
    if isinstance(y_pred, Mapping):
        return own if set(own) == set(y_pred) else sorted(y_pred)
    count = len(y_pred) if isinstance(y_pred, (list, tuple)) else 1
    return own if len(own) == count else [f"output_{i + 1}" for i in range(count)]


def _per_output(value, names: list[str], what: str, partial: bool = False) -> list:
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        unknown = [k for k in value if k not in names]
        if unknown or (missing and not partial):
            raise UsageError(f"the {what} are keyed {sorted(map(str, value))} but the model's outputs are "
                             f"{', '.join(names)}: key them by output name")
        return [value.get(n) for n in names]
    if isinstance(value, (list, tuple)) and (len(names) > 1 or len(value) == 1):
        if len(value) != len(names):
            raise UsageError(f"{len(value)} {what} for {len(names)} outputs ({', '.join(names)}): give one per "
                             f"output, or a dict by output name")
        return list(value)
    if len(names) > 1:
        raise UsageError(f"the model has {len(names)} outputs ({', '.join(names)}) but the {what} are one array: give "
                         f"a dict by output name or a list with one per output")
    return [value]
