"""Checks on the data before the first step: what a compiled call would otherwise refuse late, or in many lines.

Each refusal is one UsageError line, and each check is cheap: it reads element specs, traces the evaluation
call once (the trace the first evaluation would make anyway, so it is reused), and reads labels only for a
loss that takes class ids (the label arrays, or a dataset's first batch: no pass over the features).
  - features: XLA compiles dense numbers only, so string, ragged and sparse tensors are refused under XLA;
  - labels: a sparse categorical loss takes ids 0..classes-1; outside that range XLA silently gives NaN
    (validation: a NaN eval_loss) and TensorFlow raises a many-line error elsewhere;
  - validation data: traced against the model, loss and metrics before the first step (a wrong feature
    shape, or a metric returning one number, otherwise fails after the first epoch's work).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

import pipelines
from fastcore.engine import feeding, loss_step
from fastcore.engine.loss_step import unpack
from fastcore.engine.metrics import create_variables
from fastcore.engine.outputs import labels_per_output, line_up
from fastcore.engine.step import call_model
from fastcore.errors import FastcoreError, UsageError, gist

_XLA_REFUSES = {   # kind of tensor -> how to make it one XLA takes
    "string": "turn it into numbers in the input pipeline (e.g. a StringLookup in dataset.map)",
    "ragged": "pad it to one length (ragged.to_tensor(), or dataset.padded_batch)",
    "sparse": "make it dense (tf.sparse.to_dense)",
}


def features(spec, mode: str, what: str) -> None:
    """Under XLA (mode "xla", or "auto", which times XLA), refuse any element that is not a dense tensor
    of numbers."""
    if mode not in ("xla", "auto"):
        return
    for path, leaf in feeding.leaves(spec):
        kind = ("ragged" if isinstance(leaf, tf.RaggedTensorSpec) else "sparse" if isinstance(leaf, tf.SparseTensorSpec)
                else "string" if leaf.dtype == tf.string else None)
        if kind:
            raise UsageError(f"the {what} data's element {path} is a {kind} tensor, which XLA cannot compile: "
                             f"{_XLA_REFUSES[kind]}, or train with mode='graph'")


def before_training(engine, feed: feeding.Feed, k: int, validation_data, options, mode: str, *,
                    fastcore_loss: bool) -> tf.data.Dataset | None:
    """Everything fit checks once the step is built and before its first call: the step fastcore writes
    for loss= (traced on the data's spec) and its labels, and the validation data (returned as evaluation
    batches, or None)."""
    engine.ledger.varying_shapes = bool(feed.varying)
    if fastcore_loss:
        loss_step.check(engine, feed.dataset.element_spec, stacked=k > 1)
        training_labels(engine, feed)
    if validation_data is None:
        return None
    if engine.eval_fn is None:
        raise UsageError("validation_data needs an eval_step (a step function has no default evaluation)")
    return validation(engine, validation_data, options, mode)


def training_labels(engine, feed: feeding.Feed) -> None:
    """The training labels against the loss's classes: the label arrays, or a dataset's first batch."""
    if _class_ids(engine):
        labels(engine, feed.labels if feed.labels is not None else _first_labels(feed.user_dataset), "training")


def labels(engine, y, what: str) -> None:
    """Refuse labels outside 0..classes-1 for each output whose loss takes class ids (sparse categorical
    crossentropy; its ignore_class is allowed)."""
    found = _outside(engine, y) if y is not None else None   # None: an empty dataset, nothing to check
    if found:
        output, label, classes = found
        output = f" of output {output!r}" if output else ""
        raise UsageError(f"the {what} labels{output} include {label:g}, but the model's output has {classes} "
                         f"classes: a sparse categorical loss takes class ids 0 to {classes - 1}")


def labels_of_call(engine, batch, k: int, first_step: int) -> None:
    """After the guard stopped a call (`batch`: its batch, or K stacked; `first_step`: the step of its first):
    a label outside a sparse loss's classes in a batch after the first is bad input, not a NaN (under XLA the
    loss of such a label is NaN, where TensorFlow's kernels refuse it): DataError naming the step and label."""
    if not _class_ids(engine):
        return
    y = tf.nest.map_structure(np.asarray, unpack(batch)[1])
    for i in range(k):
        found = _outside(engine, tf.nest.map_structure(lambda v: v[i], y) if k > 1 else y)
        if found:
            output, label, classes = found
            output = f" for output {output!r}" if output else ""
            raise pipelines.DataError(f"a batch at step {first_step + i} has label {label:g}{output}, outside the "
                                      f"loss's classes [0, {classes})")


def _outside(engine, y) -> tuple[str | None, float, int] | None:
    """(the output's name when there are several, the label, the classes) of a label in `y` outside
    0..classes-1 for an output whose loss takes class ids (its ignore_class allowed), or None."""
    objective = engine.step_fn.objective
    for index, (classes, ignore) in _class_ids(engine).items():
        values = np.asarray(labels_per_output(y, objective.names)[index])
        if ignore is not None:
            values = values[values != ignore]
        if not values.size:
            continue
        low, high = values.min(), values.max()
        if low < 0 or high >= classes:
            output = objective.names[index] if len(objective.names) > 1 else None
            return output, float(low if low < 0 else high), classes
    return None


def validation(engine, data, options, mode: str) -> tf.data.Dataset:
    """fit's validation_data as evaluation batches (every example once; `options.validation_steps` batches
    when given), checked against the model, loss and metrics before the first step."""
    sizes = dict(batch_size=options.validation_batch_size, steps=options.validation_steps, what="validation")
    arrays = isinstance(data, tuple) and not feeding.is_dataset(data[0])
    if arrays:
        batches = feeding.eval_batches(data[0], data[1], sample_weight=data[2] if len(data) == 3 else None, **sizes)
    else:
        batches = feeding.eval_batches(data, **sizes)
    features(batches.element_spec[0], mode, "validation")
    _evaluation_runs(engine, batches)
    if _class_ids(engine):
        labels(engine, data[1] if arrays else data.y if isinstance(data, pipelines.Arrays) else _first_labels(data),
               "validation")
    return batches


def _evaluation_runs(engine, batches: tf.data.Dataset) -> None:
    """Trace the evaluation call on the validation batches' spec: with a fully known spec (batches of one
    shape) the compiled function's own trace, which the first evaluation reuses; else a throwaway one. In
    eager mode, which may run code no graph can hold, the call runs on the first batch instead."""
    spec = batches.element_spec
    create_variables(engine, spec[0])   # the metrics' variables, made outside any compiled function
    try:
        if engine.mode == "eager":
            for batch, weights in batches.take(1):
                engine.evaluate(batch, weights)
        elif all(s.shape.is_fully_defined() for s in tf.nest.flatten(spec)):
            engine.evaluate.get_concrete_function(*spec)
        else:
            tf.function(engine.eval_call, autograph=False).get_concrete_function(*spec)
    except FastcoreError:
        raise
    except (ValueError, TypeError) as e:   # Keras' layer-call refusal: many lines, ANSI bold
        raise UsageError(_scalar_metric(engine, spec[0])
                         or f"the model, loss or metrics refuse the validation data: {gist(e)}") from None


def _scalar_metric(engine, batch_spec) -> str | None:
    """The refusal of a metric function that returns one number per batch, if one does (evaluation weights
    each example, so a metric must give one value per example)."""
    metrics = getattr(engine.eval_fn, "metrics", None)
    functions = [m for spec in (getattr(metrics, "spec", None), getattr(metrics, "weighted_spec", None))
                 for m in tf.nest.flatten(spec or []) if callable(m) and not hasattr(m, "update_state")]
    if not functions or len(engine.models) != 1:
        return None
    model = engine.model
    found = []

    def probe(batch):
        x, y, weights = unpack(batch)
        outputs = line_up(model, y, call_model(model, x, training=False), weights)
        found.extend(fn for fn in functions for true, pred in zip(outputs.y_true, outputs.y_pred)
                     if fn(true, pred).shape.rank == 0)
    try:
        tf.function(probe, autograph=False).get_concrete_function(batch_spec)
    except Exception:   # noqa: BLE001 (no diagnosis; the caller says what failed)
        return None
    if not found:
        return None
    name = getattr(found[0], "__name__", type(found[0]).__name__)
    return (f"metric {name!r} returns one number per batch: return one value per example (reduce over the last "
            f"axis only, e.g. tf.reduce_mean(..., axis=-1)), as evaluation weighs each example")


def _class_ids(engine) -> dict:
    objective = getattr(engine.step_fn, "objective", None)
    return objective.class_ids if objective is not None else {}


def _first_labels(ds: tf.data.Dataset):
    """The labels of a dataset's first batch of (x, y[, sample_weight]), as numpy."""
    for element in ds.take(1):
        return tf.nest.map_structure(lambda t: t.numpy(), unpack(element)[1])
    return None
