"""The training loop: compiled calls of K steps, evaluation at epoch ends, callbacks.

Knows no dataset or model. Counting is in steps: a call of K steps may end inside an epoch or
span several (full-batch tasks), and evaluation runs after the call in which an epoch ended.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from fastcore.meter import Meter


class NonFiniteLoss(Exception):
    """Training produced a NaN or Inf; the update of that step (and any after it) was not applied."""

    def __init__(self, step: int):
        super().__init__(f"the loss or a gradient was not finite at step {step}")
        self.step = step


class Callback:
    """Hooks the loop calls; progress, summaries and checkpoints subclass it."""

    def on_train_begin(self, loop: "Loop") -> None: ...
    def on_call_begin(self, loop: "Loop") -> None: ...   # before the call's batch is fetched
    def on_call_end(self, loop: "Loop", loss: tf.Tensor) -> None: ...
    def on_epoch_end(self, loop: "Loop", logs: dict) -> None: ...
    def on_train_end(self, loop: "Loop") -> None: ...


@dataclasses.dataclass
class Loop:
    step: object                     # fastcore.step.Step
    train_batches: tf.data.Dataset   # infinite; [B,...] batches, or [K,B,...] when steps_per_call > 1
    eval_batches: tf.data.Dataset | None
    total_steps: int
    steps_per_epoch: int
    steps_per_call: int
    batch_size: int
    callbacks: list = dataclasses.field(default_factory=list)
    steps_done: int = 0
    history: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.meter = Meter(self.batch_size * self.steps_per_call, self.steps_per_call)
        self.train_fn = self.step.train_many if self.steps_per_call > 1 else self.step.train_one
        self.iterator = iter(self.train_batches)   # an attribute, so a checkpoint can save its position

    @property
    def epoch(self) -> float:
        return self.steps_done / self.steps_per_epoch

    def run(self) -> list[dict]:
        for cb in self.callbacks:
            cb.on_train_begin(self)
        losses = []   # tensors; read once per epoch, never per call
        while self.steps_done < self.total_steps:   # a resumed run starts past 0
            for cb in self.callbacks:
                cb.on_call_begin(self)
            x, y = self.meter.timed_next(self.iterator)
            loss = self.meter.timed_call(self.train_fn, x, y)
            bad_step = int(self.step.first_non_finite_step.numpy())   # one scalar per call, not per step
            if bad_step >= 0:
                raise NonFiniteLoss(bad_step)
            epochs_before = self.steps_done // self.steps_per_epoch
            self.steps_done += self.steps_per_call
            losses.append(loss)
            for cb in self.callbacks:
                cb.on_call_end(self, loss)
            if self.steps_done // self.steps_per_epoch > epochs_before or self.steps_done >= self.total_steps:
                self._end_epoch(losses)
                losses = []
        if not self.history:
            self._end_epoch(losses)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _end_epoch(self, losses: list) -> None:
        logs = {"epoch": round(self.epoch, 3), "steps": self.steps_done}
        if losses:   # none when a resumed run had nothing left to do
            logs["train_loss"] = float(tf.reduce_mean(tf.stack(losses)))
        if self.eval_batches is not None:
            logs.update(evaluate(self.step, self.eval_batches))
        self.history.append(logs)
        for cb in self.callbacks:
            cb.on_epoch_end(self, logs)


def evaluate(step, batches: tf.data.Dataset) -> dict:
    """Mean loss and metric over every example exactly once (padding has weight 0)."""
    totals = tf.zeros([3])
    for x, y, w in batches:
        totals += step.evaluate(x, y, w)
    loss_sum, metric_sum, count = totals.numpy().tolist()
    return {"eval_loss": loss_sum / count, f"eval_{step.metric_name}": metric_sum / count}
