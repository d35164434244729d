"""The step fastcore writes when the user gives a loss, with Keras `compile`/`fit` conventions.

Losses: a Keras loss object, a Keras loss name ("binary_crossentropy", "crossentropy"...) or a function
`(y_true, y_pred) -> per-example loss`, resolved as Keras' compile resolves them (keras/src/trainers/
compile_utils.py: names and functions are wrapped in `LossFunctionWrapper`, so labels of shape (N,) meet an
(N, 1) output as in Keras); one per output, a list or a dict by output name, with `loss_weights`. Batches are
(x, y) or (x, y, sample_weight); x, y and the weights may be dicts by input / output name (fastcore.engine.outputs).

Reduction, matched to Keras 3 (keras/src/losses/loss.py): the default "sum_over_batch_size" is the sum of the
weighted per-element losses divided by the number of elements, NOT by the sum of the weights. fastcore writes
every loss per example and divides their sum by the global batch size (`ctx.global_batch_size`), which is that
same number and stays right when tf.distribute splits the batch; "sum" and "mean_with_sample_weight" are scaled
per example to give Keras' value. A loss object's reduction None / "none" (as custom loops use) counts as the default.

A leaf of the engine: it knows Keras losses, metrics and the batch layout, nothing of runs, feeds or the Trainer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import tensorflow as tf
from keras.src.losses.loss import apply_mask, squeeze_or_expand_to_same_rank
from keras.src.trainers.compile_utils import get_loss

from fastcore.engine.metrics import Metrics, create_variables
from fastcore.engine.outputs import Outputs, line_up
from fastcore.engine.step import StepContext, Update
from fastcore.errors import FastcoreError, UsageError, gist, no_gradient

REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", "none", None)


def unpack(batch):
    """(x, y, sample_weight or None) from a batch, or from a dataset's element_spec (checked up front)."""
    if isinstance(batch, Mapping):
        raise UsageError("with loss=, each element must be (x, y) or (x, y, sample_weight); this dataset yields "
                         "dicts: map it, e.g. ds.map(lambda d: (d['image'], d['label']))")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise UsageError("with loss=, each element must be (x, y) or (x, y, sample_weight)")


class Objective:
    """The loss of every output, weighted per example: `per_example(outputs, batch)` -> (total [B], {name: [B]}).

    Once traced it knows the outputs' names and which of them take class ids (`class_ids`), so labels a
    sparse loss cannot take are refused before the first step (fastcore.engine.input_checks)."""

    def __init__(self, loss, loss_weights=None):
        _check_loss(loss)
        if loss_weights is not None and not isinstance(loss_weights, (int, float, list, tuple, Mapping)):
            raise UsageError(f"loss_weights={loss_weights!r}: give a number, a list (one per output) or a dict "
                             f"by output name")
        self.loss, self.loss_weights = loss, loss_weights
        self._resolved: dict[tuple, list] = {}
        self.names: list[str] = []
        self.class_ids: dict[int, tuple[int, object]] = {}   # output index -> (classes, ignore_class)

    def per_example(self, outputs: Outputs, global_batch) -> tuple[tf.Tensor, dict]:
        """Each example's weighted total loss, and each output's own (before `loss_weights`) when there are
        several, all such that sum / `global_batch` is Keras' value for the batch."""
        total, parts = None, {}
        for i, loss, weight, name in self._losses(outputs):
            sample_weight = outputs.sample_weight[i] if outputs.sample_weight else None
            per = _per_example(loss, outputs.y_true[i], outputs.y_pred[i], sample_weight, global_batch, name)
            if len(outputs) > 1:
                parts[f"{name}_loss"] = per
            weighted = per if weight is None else per * float(weight)
            total = weighted if total is None else total + weighted
        if total is None:
            raise UsageError("no loss for any output: give a loss for at least one of "
                             + ", ".join(outputs.names))
        return total, parts

    def _losses(self, outputs: Outputs) -> list[tuple[int, keras.losses.Loss, float | None, str]]:
        """(output index, Keras loss, loss weight, name) per output that has a loss, resolved once per layout."""
        key = (tuple(outputs.names), tuple(_layout(t) for t in outputs.y_true), tuple(_layout(p) for p in outputs.y_pred))
        if key not in self._resolved:
            specs, weights = _per_output(self.loss, outputs.names, "loss"), self._weights(outputs.names)
            self._resolved[key] = [(i, _resolve(spec, outputs.y_true[i], outputs.y_pred[i]), weights[i], outputs.names[i])
                                   for i, spec in enumerate(specs) if spec is not None]
            self.names = list(outputs.names)
            for i, loss, _, _ in self._resolved[key]:
                classes = _class_count(loss, outputs.y_pred[i])
                if classes:
                    self.class_ids[i] = (classes, loss._fn_kwargs.get("ignore_class"))
        return self._resolved[key]

    def _weights(self, names: list[str]) -> list:
        if self.loss_weights is None or isinstance(self.loss_weights, (int, float)):
            return [self.loss_weights] * len(names)
        return _per_output(self.loss_weights, names, "loss_weights")


def loss_step(model, loss, *, metrics: Metrics | None = None, loss_weights=None) -> Callable:
    """The step fastcore writes for `loss`: sum of per-example losses / global batch + regularization.

    `metrics` (shared with `loss_eval`, so the loop can reset and read them) are updated on the training
    batches too, as Keras' fit does; under a tf.distribute strategy give None (evaluation only there)."""
    objective = Objective(loss, loss_weights)

    def step(batch, ctx: StepContext) -> Update:
        x, y, sample_weight = unpack(batch)
        with tf.GradientTape() as tape:
            outputs = line_up(model, y, ctx.call(model, x), sample_weight)
            total, parts = objective.per_example(outputs, ctx.global_batch_size)
            # Sum / global batch (not mean): stays right when tf.distribute splits the batch.
            value = tf.reduce_sum(total) / ctx.global_batch_size + ctx.regularization(model)
            scaled = ctx.scale(value)
        if metrics and not tf.distribute.has_strategy():   # replicas cannot update one set of variables
            metrics.update(outputs)
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if all(g is None for g in grads):   # Python, so at the first trace: before any step
            raise no_gradient("optimizer")
        losses = {"loss": value, **{name: tf.reduce_sum(per) / ctx.global_batch_size for name, per in parts.items()}}
        return Update(losses if parts else value, zip(grads, variables))
    step.metrics, step.objective = metrics, objective
    return step


def loss_eval(model, loss, metrics=None, *, loss_weights=None) -> Callable:
    """Per-example loss (regularization included, as Keras' evaluate reports it) and each output's loss, the
    model in inference mode; `metrics` (a Metrics, or a spec for one) are updated with the padding mask."""
    objective = Objective(loss, loss_weights)
    metrics = metrics if isinstance(metrics, Metrics) else Metrics(metrics)

    def evaluate(batch, ctx: StepContext) -> dict:
        x, y, sample_weight = unpack(batch)
        outputs = line_up(model, y, ctx.call(model, x), sample_weight)
        batch_size = tf.shape(outputs.y_pred[0])[0]
        total, parts = objective.per_example(outputs, batch_size)
        if metrics:
            metrics.update(outputs, ctx.example_weights)
        return {"loss": total + ctx.regularization(model), **parts}
    evaluate.metrics = metrics
    return evaluate


def named_metrics(metrics):
    """The user's metrics, checked (names, Keras Metric objects, functions; a list, or a dict by output name)."""
    return Metrics(metrics).spec


def check(engine, element_spec, stacked: bool) -> None:
    """Trace the step once on the data's element spec in a throwaway graph, so a label that does not fit the
    model's output (or a loss that refuses it) is one UsageError before any compile, not a failed pre-flight;
    the metrics' variables are created there too (see metrics.create_variables)."""
    if stacked:   # K batches per element: the step sees one of them
        element_spec = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape[1:], s.dtype), element_spec)
    try:
        engine.log_names(element_spec)   # the step unpacks the batch as it traces
        create_variables(engine, element_spec)
    except FastcoreError:
        raise
    except (ValueError, TypeError) as e:   # Keras' layer-call refusal: many lines, ANSI bold
        raise UsageError(f"the model, loss or metrics refuse the training data: {gist(e)}") from None


# -- one output's loss -------------------------------------------------------------------------------
def _per_example(loss: keras.losses.Loss, y_true, y_pred, sample_weight, global_batch, name: str) -> tf.Tensor:
    """[B] per-example values whose sum / global_batch is `loss(y_true, y_pred, sample_weight)` as Keras 3
    computes it (masks, weights of any rank, reduction), see keras/src/losses/loss.py."""
    in_mask = keras.src.backend.get_keras_mask(y_pred)
    y_true = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_true)
    y_pred = tf.nest.map_structure(lambda t: tf.cast(t, loss.dtype), y_pred)
    try:
        values = tf.cast(loss.call(y_true, y_pred), tf.float32)
    except (ValueError, TypeError) as e:
        raise UsageError(f"the loss of output {name!r} ({getattr(loss, 'name', type(loss).__name__)}) refuses labels "
                         f"{_shape(y_true)} with predictions {_shape(y_pred)}: {str(e).strip().splitlines()[0]}") from None
    out_mask = keras.src.backend.get_keras_mask(values)
    mask = in_mask if out_mask is None else (out_mask if in_mask is None else in_mask & out_mask)
    batch = tf.shape(tf.nest.flatten(y_pred)[0])[0]
    if values.shape.rank == 0:   # a function that reduced itself: its value for every example
        values = tf.fill([batch], values)
    reduction = loss.reduction if loss.reduction not in (None, "none") else "sum_over_batch_size"
    weight = apply_mask(sample_weight, mask, dtype=tf.float32, reduction=reduction)
    if weight is not None:
        weight = tf.cast(weight, tf.float32)
        values, weight = squeeze_or_expand_to_same_rank(values, weight)
        values = values * weight
    per = tf.reshape(values, [batch, -1])
    if reduction == "sum":
        return tf.reduce_sum(per, axis=1) * tf.cast(global_batch, tf.float32)
    if reduction == "mean_with_sample_weight" and weight is not None:
        return tf.reduce_sum(per, axis=1) * tf.cast(batch, tf.float32) / tf.maximum(tf.reduce_sum(weight), 1e-12)
    return tf.reduce_mean(per, axis=1)


def _class_count(loss: keras.losses.Loss, y_pred) -> int | None:
    """The number of classes a sparse categorical loss takes ids of (the prediction's class axis), if known."""
    if getattr(getattr(loss, "fn", None), "__name__", None) != "sparse_categorical_crossentropy":
        return None
    shape = tf.nest.flatten(y_pred)[0].shape
    return shape[loss._fn_kwargs.get("axis", -1)] if shape.rank else None


def _resolve(spec, y_true, y_pred) -> keras.losses.Loss:
    try:
        loss = get_loss(spec, y_true, y_pred)
    except ValueError as e:
        raise UsageError(f"loss {spec!r}: {str(e).strip().splitlines()[0]}") from None
    if loss.reduction not in REDUCTIONS:
        raise UsageError(f"loss {loss.name!r} has reduction {loss.reduction!r}: use sum_over_batch_size, sum or "
                         f"mean_with_sample_weight")
    return loss


def _check_loss(loss) -> None:
    leaves = list(loss.values()) if isinstance(loss, Mapping) else (list(loss) if isinstance(loss, (list, tuple)) else [loss])
    for leaf in leaves:
        if leaf is not None and not (isinstance(leaf, (str, keras.losses.Loss)) or callable(leaf)):
            raise UsageError(f"loss {leaf!r} is not a Keras loss, a Keras loss name or a callable "
                             f"(y_true, y_pred) -> per-example loss")


def _per_output(spec, names: list[str], what: str) -> list:
    """One entry per output: a lone spec for every output, a list in output order, a dict by output name."""
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise UsageError(f"{what} keys {sorted(map(str, unknown))} are not outputs of the model "
                             f"({', '.join(names)}): key {what} by output name")
        return [spec.get(n) for n in names]
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(names):
            raise UsageError(f"{len(spec)} {what} for {len(names)} outputs ({', '.join(names)}): give one per output, "
                             f"or a dict by output name")
        return list(spec)
    return [spec] * len(names)


def _layout(t) -> tuple:
    return tuple(getattr(t, "shape", ())), str(getattr(t, "dtype", ""))


def _shape(t) -> str:
    return str([leaf.shape.as_list() for leaf in tf.nest.flatten(t)][0] if tf.nest.flatten(t) else None)
