"""The training loop: compiled calls of K steps, evaluation at epoch ends, callbacks.

Knows no dataset or model. Counting is in steps: a call of K steps may end inside an epoch or
span several (full-batch tasks), and evaluation runs after the call in which an epoch ended.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from fastcore.callbacks import Callback
from fastcore.observe.meter import Meter


class StopRequested(Exception):
    """The loop's `should_stop` asked it to stop after the call that just ended."""


class NonFiniteLoss(Exception):
    """Training produced a NaN or Inf; the update of that step (and any after it) was not applied."""

    def __init__(self, step: int):
        super().__init__(f"the loss or a gradient was not finite at step {step}")
        self.step = step


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
    call_override: object = None     # set by a callback for the next call: (batch) -> logs, run instead

    def __post_init__(self):
        self.meter = Meter(self.batch_size * self.steps_per_call, self.steps_per_call)
        self.train_fn = self.engine.train_many if self.steps_per_call > 1 else self.engine.train_one
        self.iterator = iter(self.train_batches)   # an attribute, so a checkpoint can save its position

    @property
    def epoch(self) -> float:
        return self.steps_done / self.steps_per_epoch

    def run(self) -> list[dict]:
        for cb in self.callbacks:
            cb.on_train_begin(self)
        calls = []   # per-call log tensors; read once per epoch, never per call
        while self.steps_done < self.total_steps:   # a resumed run starts past 0
            for cb in self.callbacks:
                cb.on_call_begin(self)
            batch = self.meter.timed_next(self.iterator)
            logs = self.meter.timed_call(self.call_override or self.train_fn, batch)
            self.call_override = None
            bad_step = int(self.engine.first_non_finite_step.numpy())   # one scalar per call, not per step
            if bad_step >= 0:
                raise NonFiniteLoss(bad_step)
            epochs_before = self.steps_done // self.steps_per_epoch
            self.steps_done += self.steps_per_call
            calls.append(logs)
            self.ending_epoch = (self.steps_done // self.steps_per_epoch > epochs_before
                                 or self.steps_done >= self.total_steps)
            for cb in self.callbacks:
                cb.on_call_end(self, logs)
            if self.ending_epoch:
                self._end_epoch(calls)
                calls = []
            if self.should_stop is not None and self.should_stop() and self.steps_done < self.total_steps:
                raise StopRequested()
        if not self.history:
            self._end_epoch(calls)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _end_epoch(self, calls: list[dict]) -> None:
        logs = {"epoch": round(self.epoch, 3), "steps": self.steps_done}
        if calls:   # none when a resumed run had nothing left to do
            for name in calls[0]:
                logs[f"train_{name}"] = float(tf.reduce_mean(tf.stack([c[name] for c in calls])))
        if self.eval_batches is not None:
            logs.update(evaluate(self.engine, self.eval_batches))
        self.history.append(logs)
        for cb in self.callbacks:
            cb.on_epoch_end(self, logs)


def evaluate(engine, batches: tf.data.Dataset) -> dict:
    """Mean of each eval value over every example exactly once (padding has weight 0)."""
    totals = None
    for batch, weights in batches:
        sums = engine.evaluate(batch, weights)
        totals = sums if totals is None else totals + sums
    *sums, count = totals.numpy().tolist()
    return {f"eval_{name}": value / count for name, value in zip(engine.eval_names, sums)}
