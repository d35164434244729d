"""Metrics as Keras `compile(metrics=...)` takes them: names, functions or `keras.metrics.Metric` objects, per output.

Names resolve as Keras resolves them (keras/src/trainers/compile_utils.py): "accuracy"/"acc" becomes binary,
sparse categorical or categorical accuracy from the label and prediction shapes; other strings go through
`keras.metrics.get`; a function becomes a `MeanMetricWrapper`. Their state lives in the metrics' own variables,
updated inside the compiled calls (no host read per step) and read once per epoch; the loop resets them at the
start of each epoch and before each evaluation (see fastcore.engine.loop). As in Keras, `metrics` ignore sample
weights and `weighted_metrics` use them; evaluation also weights every update by its padding mask (0 on the
padded rows), so each example counts exactly once.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping

import keras
import tensorflow as tf
from keras.src.trainers.compile_utils import get_metric

from fastcore.engine.outputs import Outputs
from fastcore.errors import UsageError


class Metrics:
    """The resolved metrics of one model: `update` inside a compiled call, `reset_state` and `result` between."""

    def __init__(self, metrics=None, weighted_metrics=None):
        self.spec, self.weighted_spec = _checked(metrics, "metrics"), _checked(weighted_metrics, "weighted_metrics")
        self._built: list[tuple[str, keras.metrics.Metric, bool, int]] | None = None   # (name, metric, weighted, output)
        self._lock = threading.Lock()   # the pre-flight traces the step on a second thread beside the training call

    def __bool__(self) -> bool:
        return bool(self.spec or self.weighted_spec)

    @property
    def built(self) -> bool:
        return self._built is not None

    def update(self, outputs: Outputs, mask=None) -> None:
        """Update every metric with one batch; `mask` [B] (1 real example, 0 padding) weights every update."""
        with self._lock, tf.init_scope():   # variables created once and eagerly, whichever graph traces first
            if self._built is None:
                self._built = self._build(outputs)
        for _, metric, weighted, i in self._built:
            weight = outputs.sample_weight[i] if weighted and outputs.sample_weight else None
            if mask is not None:
                weight = mask if weight is None else _times_mask(weight, mask)
            metric.update_state(outputs.y_true[i], outputs.y_pred[i], sample_weight=weight)

    def reset_state(self) -> None:
        for _, metric, _, _ in self._built or ():
            metric.reset_state()

    def result(self) -> dict:
        """{log name: value} as Keras names them (`<output>_<metric>` with several outputs); {} before any update."""
        return {name: float(metric.result()) for name, metric, _, _ in self._built or ()}

    @property
    def variables(self) -> list:
        """Every metric's state (the engine puts it back after a step that was not applied)."""
        return [v for _, metric, _, _ in self._built or () for v in metric.variables]

    def by_name(self) -> dict:
        """{log name: keras Metric} (e.g. for a monitor's direction, `Metric._direction`)."""
        return {name: metric for name, metric, _, _ in self._built or ()}

    def _build(self, outputs: Outputs) -> list:
        built = []
        for weighted, spec in ((False, self.spec), (True, self.weighted_spec)):
            for i, identifiers in enumerate(_per_output(spec, outputs)):
                prefix = f"{outputs.names[i]}_" if len(outputs) > 1 else ""
                for label, identifier in identifiers:
                    metric = _resolve(identifier, outputs.y_true[i], outputs.y_pred[i], label)
                    taken = [n for n, _, _, _ in built]
                    name = prefix + metric.name
                    if weighted and name in taken:   # as Keras names a weighted twin of an unweighted metric
                        name = f"{prefix}weighted_{metric.name}"
                    built.append((_unique(name, taken), metric, weighted, i))
        return built


def create_variables(engine, batch_spec) -> None:
    """Trace the engine's step and evaluation once each in throwaway graphs, so that the metrics they update
    have their variables before any compiled call traces: variables created during a tf.function's first
    trace make it trace a second time. `batch_spec`: one batch's (x, y[, sample_weight]) spec."""
    train = getattr(engine.step_fn, "metrics", None)
    if train and not train.built:
        tf.function(lambda b: engine.compute(b)[0], autograph=False).get_concrete_function(batch_spec)
    evaluation = getattr(engine.eval_fn, "metrics", None)
    if evaluation and not evaluation.built:
        weights = tf.TensorSpec(tf.nest.flatten(batch_spec)[0].shape[:1], tf.float32)
        tf.function(engine.eval_call, autograph=False).get_concrete_function(batch_spec, weights)


def _checked(spec, argument: str):
    """The user's metrics spec, refused in one line when an entry is neither a name, a callable nor a Metric."""
    if spec is None:
        return None
    leaves = list(spec.values()) if isinstance(spec, Mapping) else (spec if isinstance(spec, (list, tuple)) else [spec])
    flat = [m for leaf in leaves for m in (leaf if isinstance(leaf, (list, tuple)) else [leaf])]
    for m in flat:
        if m is not None and not (isinstance(m, str) or callable(m)):
            raise UsageError(f"{argument} entry {m!r} is not a metric: give a name ('accuracy', 'mae'), a "
                             f"keras.metrics.Metric, or a function (y_true, y_pred) -> per-example values")
    return spec


def _per_output(spec, outputs: Outputs) -> list[list[tuple[str | None, object]]]:
    """For each output, [(log label or None, metric identifier)] following Keras' compile rules; a dict whose
    keys are not output names names its metrics instead (fastcore's `{name: function}`), for a single output."""
    n = len(outputs)
    if not spec:
        return [[] for _ in range(n)]
    if isinstance(spec, Mapping) and not set(spec) <= set(outputs.names):
        if n > 1:
            raise UsageError(f"metrics keys {sorted(spec)} are not output names: with {n} outputs, key metrics by "
                             f"output name ({', '.join(map(str, outputs.names))})")
        return [[(label, m) for label, m in spec.items()]]
    if n == 1:
        leaves = list(spec.values()) if isinstance(spec, Mapping) else spec
        return [[(None, m) for m in tf.nest.flatten(leaves)]]
    if isinstance(spec, Mapping):
        per = [spec.get(name) for name in outputs.names]
    elif isinstance(spec, (list, tuple)) and len(spec) == n:
        per = list(spec)
    else:
        raise UsageError(f"the model has {n} outputs ({', '.join(map(str, outputs.names))}): give metrics per output, "
                         f"as a dict by output name or a list of {n} (one entry or list each)")
    return [[(None, m) for m in tf.nest.flatten(p)] if p is not None else [] for p in per]


def _resolve(identifier, y_true, y_pred, label: str | None) -> keras.metrics.Metric:
    try:
        metric = get_metric(identifier, y_true, y_pred)
    except ValueError as e:
        raise UsageError(f"metric {identifier!r}: {str(e).splitlines()[0]}") from None
    if label is not None:
        metric.name = label
    return metric


def _times_mask(weight, mask):
    """The sample weight times the padding mask, the mask broadcast over the weight's extra axes."""
    weight = tf.cast(weight, tf.float32)
    mask = tf.reshape(tf.cast(mask, tf.float32), [-1] + [1] * (weight.shape.rank - 1))
    return weight * mask


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    k = 1
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"
