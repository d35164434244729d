"""The training loop: compiled calls of K steps, evaluation at epoch ends, callbacks.

Knows no dataset or model. Counting is in steps: a call of K steps may end inside an epoch or
span several (full-batch tasks), and evaluation runs after the call in which an epoch ended.
Stateful metrics ride on the step and eval functions (`step_fn.metrics`, `eval_fn.metrics`: anything with
`reset_state()` and `result() -> {name: float}`, e.g. fastcore.engine.metrics.Metrics): the loop resets them
when an epoch begins and before each evaluation, and reads them once when the epoch ends.
An epoch's train_<name> is the mean over its applied steps: a skipped step (a float16 overflow) is left out
and counted (`skipped_steps` in the epoch's logs). A figure that is NaN/Inf at the epoch's end (a
diagnostic log, an evaluation over data the loss cannot take) is kept and named in the logs' `non_finite`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import tensorflow as tf

from fastcore.callbacks import Callback
from fastcore.engine.metrics import create_variables
from fastcore.observe.meter import Meter


class StopRequested(Exception):
    """The loop's `should_stop` asked it to stop after the call that just ended."""


class NonFiniteLoss(Exception):
    """Training produced a NaN or Inf; the update of that step (and any after it) was not applied.
    `batch`: the call's batch (K stacked), `first_step`: the step of its first, to look for the cause."""

    def __init__(self, step: int, batch=None, first_step: int | None = None):
        super().__init__(f"the loss or a gradient was not finite at step {step}")
        self.step, self.batch, self.first_step = step, batch, first_step


@dataclasses.dataclass
class Loop:
    engine: object                   # fastcore.engine.step.Engine
    train_batches: tf.data.Dataset   # infinite; batches, or K stacked batches when steps_per_call > 1
    eval_batches: tf.data.Dataset | None   # (batch, weights) pairs, every example once
    total_steps: int
    steps_per_epoch: int
    steps_per_call: int
    batch_size: int
    callbacks: list[Callback] = dataclasses.field(default_factory=list)
    steps_done: int = 0
    history: list = dataclasses.field(default_factory=list)
    should_stop: object = None       # () -> bool, asked after each call (e.g. a SIGTERM arrived)
    ending_epoch: bool = False       # during on_call_end: whether this call ends an epoch (its eval follows)
    stop_training: bool = False      # set by a callback: the epoch ends after this call (with its evaluation)
    non_finite_stops: bool = False   # set by a callback: a non-finite step ends the run (not NonFiniteLoss)
    epoch_index: int = 0             # the 0-based number of the epoch in progress (or just ended)
    applied_before: object = None    # the engine's `applied` when the epoch began (a tensor, read at its end)

    def __post_init__(self):
        self.meter = Meter(self.batch_size * self.steps_per_call, self.steps_per_call)
        self.train_fn = self.engine.train_many if self.steps_per_call > 1 else self.engine.train_one
        self.iterator = iter(self.train_batches)   # an attribute, so a checkpoint can save its position

    @property
    def epoch(self) -> float:
        return self.steps_done / self.steps_per_epoch

    def run(self) -> list[dict]:
        """Train to total_steps (the metrics' variables exist already: fastcore.engine.loss_step.check)."""
        for cb in self.callbacks:
            cb.on_train_begin(self)
        calls = []   # (per-call log tensors, `applied` after the call); read once per epoch, never per call
        while self.steps_done < self.total_steps and not self.stop_training:   # a resumed run starts past 0
            if not calls:
                self._begin_epoch()
                self.applied_before = self.engine.applied.read_value()
            for cb in self.callbacks:
                cb.on_call_begin(self)
            batch = self.meter.timed_next(self.iterator)
            logs = self.meter.timed_call(self.train_fn, batch)
            bad_step = int(self.engine.first_non_finite_step.numpy())   # one scalar per call, not per step
            if bad_step >= 0 and not self.non_finite_stops:
                raise NonFiniteLoss(bad_step, batch, self.steps_done + 1)
            self.stop_training = self.stop_training or bad_step >= 0   # the guard applied nothing from bad_step on
            epochs_before = self.steps_done // self.steps_per_epoch
            self.steps_done += self.steps_per_call
            calls.append((logs, self.engine.applied.read_value()))
            self.ending_epoch = (self.steps_done // self.steps_per_epoch > epochs_before
                                 or self.steps_done >= self.total_steps)
            for cb in self.callbacks:
                cb.on_call_end(self, logs)
            if self.ending_epoch or self.stop_training:
                self._end_epoch(calls)
                calls = []
            if self.should_stop is not None and self.should_stop() and self.steps_done < self.total_steps:
                raise StopRequested()
        if not self.history:
            self._end_epoch(calls)
        self._finalize_optimizers()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _begin_epoch(self) -> None:
        self.epoch_index = self.steps_done // self.steps_per_epoch
        train_metrics = getattr(self.engine.step_fn, "metrics", None)
        if train_metrics:
            train_metrics.reset_state()
        for cb in self.callbacks:
            cb.on_epoch_begin(self)

    def _end_epoch(self, calls: list[tuple[dict, tf.Tensor]]) -> None:
        logs = {"epoch": round(self.epoch, 3), "steps": self.steps_done}
        if calls:   # none when a resumed run had nothing left to do
            logs.update(self._train_means(calls))
            train_metrics = getattr(self.engine.step_fn, "metrics", None)
            if train_metrics:   # read before the evaluation resets them (they may be the same metrics)
                logs.update({f"train_{name}": value for name, value in train_metrics.result().items()})
        if self.eval_batches is not None:
            logs.update(evaluate(self.engine, self.eval_batches))
        bad = [name for name, value in logs.items() if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            logs["non_finite"] = bad
        self.history.append(logs)
        for cb in self.callbacks:
            cb.on_epoch_end(self, logs)

    def _train_means(self, calls: list[tuple[dict, tf.Tensor]]) -> dict:
        """Each log's mean over the epoch's applied steps (a call weighs its applied steps; its logs are
        their mean), and how many steps were skipped; over every step when none was applied."""
        applied = tf.stack([after for _, after in calls])
        counts = tf.cast(applied - tf.concat([[self.applied_before], applied[:-1]], 0), tf.float32)
        counted = float(tf.reduce_sum(counts))
        out = {}
        for name in calls[0][0]:
            values = tf.stack([tf.cast(c[name], tf.float32) for c, _ in calls])
            mean = (tf.reduce_sum(tf.where(counts > 0, values * counts, 0.0)) / counted if counted
                    else tf.reduce_mean(values))
            out[f"train_{name}"] = float(mean)
        skipped = len(calls) * self.steps_per_call - int(counted)
        if skipped:
            out["skipped_steps"] = skipped
        return out

    def _finalize_optimizers(self) -> None:
        """As Keras' fit ends: an optimizer with `use_ema` puts its moving averages into the weights."""
        scope = self.engine.strategy.scope() if hasattr(self.engine, "strategy") else contextlib.nullcontext()
        with scope:
            for name, optimizer in self.engine.optimizers.items():
                if hasattr(optimizer, "finalize_variable_values"):
                    optimizer.finalize_variable_values(list(self.engine.variables_for(name)))


def evaluate(engine, batches: tf.data.Dataset) -> dict:
    """Mean of each eval value over every example exactly once (padding has weight 0), and the eval
    function's stateful metrics over the same examples."""
    metrics = getattr(engine.eval_fn, "metrics", None)
    if metrics:
        create_variables(engine, batches.element_spec[0])
        metrics.reset_state()
    totals = None
    for batch, weights in batches:
        sums = engine.evaluate(batch, weights)
        totals = sums if totals is None else totals + sums
    *sums, count = totals.numpy().tolist()
    logs = {f"eval_{name}": value / count for name, value in zip(engine.eval_names, sums)}
    if metrics:
        logs.update({f"eval_{name}": value for name, value in metrics.result().items()})
    return logs
