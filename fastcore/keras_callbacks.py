"""Keras callbacks (`keras.callbacks.Callback`) in a fastcore run, seeing what they see in Keras' `fit`.

`adapt(callbacks, engine, epochs=, steps_per_epoch=)` passes fastcore Callbacks through and wraps the Keras
ones in one fastcore Callback that drives them: `set_model` (the trained Keras model, its `optimizer` attribute
set to the run's optimizer so ReduceLROnPlateau / LearningRateScheduler reach the learning rate), `set_params`,
on_train_begin/end, on_epoch_begin/end with Keras-named logs (`loss`, `<metric>`, `val_loss`, `val_<metric>`)
and on_train_batch_end once per compiled call (K steps). `model.stop_training = True` ends the run after the
current epoch's evaluation, as in Keras. A monitor in mode "auto" (EarlyStopping, ModelCheckpoint,
ReduceLROnPlateau) learns its direction from the run's metrics, which Keras reads from a compiled model.
Batch-level logs are read from the device only when some callback has a batch hook: one read per call.
"""
from __future__ import annotations

import keras
from keras.src.callbacks.monitor_callback import MonitorCallback
from keras.src.callbacks.terminate_on_nan import TerminateOnNaN

from fastcore.callbacks import Callback
from fastcore.errors import UsageError

BATCH_HOOKS = ("on_train_batch_end", "on_batch_end")


def adapt(callbacks, engine, *, epochs: int, steps_per_epoch: int, verbose: int = 0) -> list[Callback]:
    """fastcore Callbacks as given, followed by one adapter for the Keras callbacks among `callbacks` (if any)."""
    own, foreign = [], []
    for cb in callbacks or ():
        if isinstance(cb, Callback):
            own.append(cb)
        elif isinstance(cb, keras.callbacks.Callback):
            foreign.append(cb)
        else:
            raise UsageError(f"callback {cb!r} is neither a fastcore.callbacks.Callback nor a "
                             f"keras.callbacks.Callback: subclass one of them")
    if foreign:
        own.append(KerasCallbacks(foreign, engine, {"verbose": verbose, "epochs": epochs, "steps": steps_per_epoch}))
    return own


class KerasCallbacks(Callback):
    """Drives a list of keras.callbacks.Callback from fastcore's loop (see the module doc)."""

    def __init__(self, callbacks: list, engine, params: dict):
        self.callbacks, self.engine, self.params = list(callbacks), engine, params
        self.model = engine.model
        self.batch_hooks = any(_overrides(cb, hook) for cb in self.callbacks for hook in BATCH_HOOKS)
        self.epoch_logs: dict | None = None
        self._sums: dict[str, float] = {}   # this epoch's per-call means, summed (batch logs are running means)
        self._calls = 0

    def on_train_begin(self, loop) -> None:
        if any(isinstance(cb, TerminateOnNaN) for cb in self.callbacks):
            loop.non_finite_stops = True   # Keras' TerminateOnNaN ends the run instead of an error
        self.model.stop_training = False
        self.model.optimizer = self.engine.optimizer
        for cb in self.callbacks:
            cb.set_model(self.model)
            cb.set_params(dict(self.params))
            cb.on_train_begin(logs=None)

    def on_epoch_begin(self, loop) -> None:
        self._sums, self._calls = {}, 0
        for cb in self.callbacks:
            cb.on_epoch_begin(loop.epoch_index, logs=None)

    def on_call_end(self, loop, logs: dict) -> None:
        if not self.batch_hooks:
            return
        self._calls += 1
        for name, value in logs.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        batch_logs = {name: total / self._calls for name, total in self._sums.items()}
        batch_logs.update(_metrics_so_far(loop.engine.step_fn))
        batch = loop.steps_done - loop.epoch_index * loop.steps_per_epoch - 1
        for cb in self.callbacks:
            cb.on_train_batch_end(batch, logs=dict(batch_logs))
        self._honour_stop(loop)

    def on_epoch_end(self, loop, logs: dict) -> None:
        self.epoch_logs = keras_logs(logs)
        self._set_directions(loop)
        for cb in self.callbacks:
            cb.on_epoch_end(loop.epoch_index, logs=self.epoch_logs)
        self._honour_stop(loop)

    def on_train_end(self, loop) -> None:
        for cb in self.callbacks:
            cb.on_train_end(logs=self.epoch_logs)

    def _honour_stop(self, loop) -> None:
        if getattr(self.model, "stop_training", False):
            loop.stop_training = True

    def _set_directions(self, loop) -> None:
        """Give each auto-mode monitor the direction Keras would read from the compiled model's metrics."""
        metrics = {}
        for fn in (loop.engine.step_fn, loop.engine.eval_fn):
            found = getattr(fn, "metrics", None)
            if found and hasattr(found, "by_name"):
                metrics.update(found.by_name())
        for cb in self.callbacks:
            if isinstance(cb, MonitorCallback) and cb.monitor_op is None and cb.mode == "auto":
                name = cb.monitor.removeprefix("val_")
                if name.endswith("loss"):
                    cb.mode = "min"
                elif getattr(metrics.get(name), "_direction", None) in ("up", "down"):
                    cb.mode = "max" if metrics[name]._direction == "up" else "min"


def keras_logs(logs: dict) -> dict:
    """fastcore's epoch logs under Keras' names: train_<x> -> <x>, eval_<x> -> val_<x>."""
    out = {}
    for name, value in logs.items():
        if name.startswith("train_"):
            out[name[len("train_"):]] = float(value)
        elif name.startswith("eval_"):
            out["val_" + name[len("eval_"):]] = float(value)
    return out


def _metrics_so_far(step_fn) -> dict:
    metrics = getattr(step_fn, "metrics", None)
    return metrics.result() if metrics else {}


def _overrides(cb, hook: str) -> bool:
    """Whether `cb` does something in `hook` (Keras marks its base class's empty hooks as default)."""
    return not getattr(getattr(cb, hook), "_is_default", False)
