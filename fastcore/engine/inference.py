"""Compiled evaluation and prediction on data the user hands over, every example exactly once.

evaluate: the engine's compiled eval call (`Engine.evaluate`) over batches all of one size, the last one
padded with copies of its rows at weight 0 (feeding.eval_batches), averaged as the loop averages its
validation (loop.evaluate), and named as Keras' `evaluate(return_dict=True)` names them: "loss", then the
metrics.
predict: one compiled forward function per engine and model (XLA under mode="xla"), called on batches all
of one size: the last is padded and its padding cut off, so each input shape compiles once, never once
per batch (the trace ledger's "predict" entry counts them, within the engine's `max_shapes`).
"""
from __future__ import annotations

import math
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from fastcore.engine import feeding, loop
from fastcore.engine.step import call_model
from fastcore.errors import UsageError

PREDICT_BATCH = 32   # Keras' predict default: a short call pads to this many rows, not to a large batch

# engine -> {model name: compiled forward}; an entry lives as long as its engine (the forward functions
# hold the model and the ledger, never the engine), so repeated predict calls reuse one compile.
_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def evaluate(engine, x, y=None, *, batch_size: int | None = None, sample_weight=None, return_dict: bool = True):
    """{name: mean over every example of `x`} ("loss", metrics), as Keras' evaluate(return_dict=True).

    `x, y[, sample_weight]` numpy arrays (or dicts / lists of them), or `x` a tf.data.Dataset of batches.
    A NaN/Inf value is returned as computed, with a RuntimeWarning naming it.
    return_dict=False: the loss alone when it is the only value, else the values in order (as Keras)."""
    if feeding.is_dataset(x) and (y is not None or sample_weight is not None):
        raise UsageError("y and sample_weight must be None when x is a tf.data.Dataset: its elements carry them")
    if engine.eval_fn is None:
        raise UsageError("evaluate needs an evaluation: give eval_step= with step= (a step function has none)")
    batches = feeding.eval_batches(x, y, batch_size=batch_size, sample_weight=sample_weight)
    values = {name[len("eval_"):]: value for name, value in loop.evaluate(engine, batches).items()}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:   # returned as computed, but never passed off as a normal figure
        warnings.warn(f"evaluate: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} NaN/Inf (labels the loss "
                      f"cannot take, or NaN/Inf in the data or weights)", RuntimeWarning, stacklevel=3)
    if return_dict:
        return values
    return values["loss"] if list(values) == ["loss"] else list(values.values())


def predict(engine, x, *, batch_size: int | None = None, model: str | None = None):
    """The model's outputs for every example of `x`, in order, as numpy (a dict or list for a model with
    several outputs), as Keras' predict. `x`: numpy arrays (or a dict / list of them: several inputs) or a
    tf.data.Dataset of batches (x, or (x, y[, sample_weight]) whose labels are ignored). `model` names the
    model to run when the engine has several."""
    forward = _forward(engine, _model_name(engine, model))
    outputs = [tf.nest.map_structure(lambda t, n=n: np.asarray(t)[:n], forward(batch))
               for batch, n in _padded_inputs(x, batch_size)]
    if not outputs:
        raise UsageError("predict got no examples")
    try:
        return tf.nest.map_structure(lambda *parts: np.concatenate(parts), *outputs)
    except ValueError as e:
        raise UsageError(f"predict's outputs differ in shape from batch to batch ({str(e).splitlines()[0]}): "
                         f"pad the inputs to one length, or call predict per length") from None


def _model_name(engine, model: str | None) -> str:
    if model is None:
        if len(engine.models) != 1:
            raise UsageError(f"there are {len(engine.models)} models ({', '.join(engine.models)}): "
                             f"pass model= the name of the one to predict with")
        return next(iter(engine.models))
    if model not in engine.models:
        raise UsageError(f"no model named {model!r}: the models are {', '.join(engine.models)}")
    return model


def _forward(engine, name: str):
    """The compiled inference-mode call of model `name`, made once per engine."""
    forwards = _FORWARDS.setdefault(engine, {})
    if name not in forwards:
        net, ledger = engine.models[name], engine.ledger
        label = "predict" if len(engine.models) == 1 else f"predict {name}"

        def forward(x):
            if not tf.executing_eagerly():   # Python runs here only while tracing
                ledger.record(label, x, names=("x",))
            return call_model(net, x, training=False)
        forwards[name] = forward if engine.mode == "eager" else tf.function(
            forward, jit_compile=engine.mode == "xla", autograph=False)
    return forwards[name]


def _padded_inputs(x, batch_size: int | None):
    """(inputs of one batch, number of real rows): every batch holds the same number of rows."""
    if feeding.is_dataset(x):
        for element, weights in feeding.eval_batches(x, batch_size=batch_size):
            yield keras.utils.unpack_x_y_sample_weight(element)[0], int(np.sum(weights.numpy()))
        return
    arrays = tf.nest.map_structure(_array, x)
    total = len(tf.nest.flatten(arrays)[0])
    size = batch_size or PREDICT_BATCH
    for start in range(0, total, size):
        n = min(size, total - start)
        yield tf.nest.map_structure(lambda a: tf.convert_to_tensor(_pad(a[start:start + n], size)), arrays), n


def _array(a) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == np.float64 else a


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """`a` grown to `size` rows with copies of its own (real rows, as evaluation pads; cut off after)."""
    if len(a) == size:
        return a
    return np.concatenate([a, a[np.arange(size - len(a)) % len(a)]])
