"""`class_weight` -> per-example sample weights, as Keras' fit makes them.

Keras semantics (keras/src/trainers/data_adapters: data_adapter_utils.class_weight_to_sample_weights for arrays,
tf_dataset_adapter.make_class_weight_map_fn for datasets): the class of an example is its label rounded to an
integer (labels of shape (N,) or (N, 1)) or the argmax of a one-hot / probability row; a class missing from
the dict weighs 1.0; `class_weight` with `sample_weight`, or with a model of several outputs, is refused.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from fastcore.errors import UsageError


def check(class_weight, sample_weight=None) -> dict[int, float]:
    """The class weights as {class id: weight}, refused in one line when Keras would refuse them."""
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise UsageError("class_weight must be a non-empty dict {class id: weight}, e.g. {0: 1.0, 1: 5.0}")
    if sample_weight is not None:
        raise UsageError("give class_weight or sample_weight, not both (fold the class weights into sample_weight)")
    try:
        weights = {int(k): float(v) for k, v in class_weight.items()}
    except (TypeError, ValueError):
        raise UsageError(f"class_weight {dict(class_weight)!r}: keys must be integer class ids and values numbers") from None
    if min(weights) < 0:
        raise UsageError(f"class_weight has class id {min(weights)}: class ids start at 0")
    return weights


def for_arrays(y, class_weight) -> np.ndarray:
    """float32 [N] sample weights for labels `y` (numpy), as Keras' fit derives them from `class_weight`."""
    weights = check(class_weight)
    if isinstance(y, (Mapping, list, tuple)):
        raise UsageError("class_weight is only supported for a model with a single output: give sample_weight "
                         "per output instead")
    classes = _classes(np.asarray(y))
    table = np.ones(max(max(weights), int(classes.max(initial=0))) + 1, np.float32)
    for k, v in weights.items():
        table[k] = v
    return table[classes]


def for_dataset(dataset: tf.data.Dataset, class_weight) -> tf.data.Dataset:
    """`dataset` of (x, y) batches -> (x, y, class weight per example), as Keras' fit maps it."""
    weights = check(class_weight)
    spec = dataset.element_spec
    if isinstance(spec, tuple) and len(spec) == 3:
        raise UsageError("the dataset already yields sample weights (x, y, w): give class_weight or sample "
                         "weights, not both")
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise UsageError("with class_weight, the dataset must yield (x, y) batches")
    if isinstance(spec[1], (Mapping, list, tuple)):
        raise UsageError("class_weight is only supported for a model with a single output: give sample "
                         "weights per output instead")
    table = tf.constant([weights.get(c, 1.0) for c in range(max(weights) + 1)], tf.float32)

    def add_weights(x, y):
        if y.shape.rank is not None and y.shape.rank >= 2 and y.shape[-1] != 1:
            classes = tf.argmax(y, axis=-1, output_type=tf.int32)
        else:
            flat = tf.reshape(y, [-1]) if y.shape.rank and y.shape.rank >= 2 else y
            classes = tf.cast(tf.round(tf.cast(flat, tf.float32)), tf.int32)
        # A class beyond the dict weighs 1.0, as with arrays (Keras' gather would fail on it).
        known = tf.logical_and(classes >= 0, classes < table.shape[0])
        return x, y, tf.where(known, tf.gather(table, tf.clip_by_value(classes, 0, table.shape[0] - 1)), 1.0)
    return dataset.map(add_weights)


def _classes(y: np.ndarray) -> np.ndarray:
    if y.ndim > 1:
        y = np.argmax(y, axis=-1) if y.shape[-1] != 1 else np.squeeze(y, axis=-1)
    classes = np.round(y).astype(np.int64)
    if classes.size and classes.min() < 0:
        raise UsageError(f"class_weight needs class ids >= 0; the labels hold {classes.min()}")
    return classes


def with_class_weight(x, y, sample_weight, class_weight):
    """(x, sample_weight) with `class_weight` folded in: a dataset's elements gain the weights, arrays get a
    sample_weight array; unchanged when class_weight is None."""
    if class_weight is None:
        return x, sample_weight
    check(class_weight, sample_weight)
    if isinstance(x, tf.data.Dataset):
        return for_dataset(x, class_weight), sample_weight
    return x, for_arrays(y, class_weight)
