"""Checkpoints: every model's variables, every optimizer, the step counters, the data iterator.

Saved with tf.train.Checkpoint through a CheckpointManager (keeps the last few). A save writes
its files first and only then rewrites the manager's `checkpoint` index (atomically), so a crash
during a save leaves the previous checkpoint the latest usable one.
"""
from __future__ import annotations

import tensorflow as tf

from fastcore.callbacks import Callback
from fastcore.errors import CheckpointMismatch

PRECISION_KEY = "precision/.ATTRIBUTES/VARIABLE_VALUE"


def recorded_precision(directory: str) -> str | None:
    """The precision the latest checkpoint in `directory` was trained in (None: no checkpoint)."""
    latest = tf.train.latest_checkpoint(directory)
    if not latest:
        return None
    reader = tf.train.load_checkpoint(latest)
    return reader.get_tensor(PRECISION_KEY).decode() if reader.has_tensor(PRECISION_KEY) else None


class Checkpoints(Callback):
    """Saves every `every_steps` steps (at the next call end) and at the end; restores on resume.

    `with_data=False` leaves the data iterator out (a pipeline whose position cannot be saved): a
    resumed run then restarts its data from the beginning.
    """

    def __init__(self, directory: str, every_steps: int, resume: bool, precision: str, keep: int = 3,
                 with_data: bool = True):
        self.directory, self.every_steps, self.resume, self.keep = directory, every_steps, resume, keep
        self.precision, self.with_data = precision, with_data
        self.restored_from: str | None = None

    def attach(self, loop) -> None:
        engine = loop.engine
        # Model variables as lists: Keras 3 models are not tracked as checkpoint children, and a list
        # also covers a Keras-free tf.Module (weights and RNG state alike).
        parts = {"models": {name: list(m.variables) for name, m in engine.models.items()},
                 "optimizers": {name: opt for name, opt in engine.optimizers.items()
                                if isinstance(opt, tf.__internal__.tracking.Trackable)}}
        if self.with_data:
            parts["data"] = loop.iterator
        self.checkpoint = tf.train.Checkpoint(steps=engine.steps, applied=engine.applied,
                                              precision=tf.Variable(self.precision, trainable=False), **parts)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=self.keep)

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def on_train_begin(self, loop) -> None:
        self.attach(loop)
        if self.resume and self.latest:
            written_in = recorded_precision(self.directory)
            if written_in != self.precision:   # float32 variables fit any policy: restore would not notice
                raise CheckpointMismatch(f"cannot resume from {self.latest}: it was trained in {written_in}, this run "
                                         f"is {self.precision}; resume with --precision {written_in} (or auto)")
            try:
                self.checkpoint.restore(self.latest).assert_consumed()
            except (AssertionError, ValueError, tf.errors.OpError) as e:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointMismatch(f"cannot resume from {self.latest}: it does not match this run's flags "
                                         f"({first_line[:200]}); resume with the flags of the run that wrote it, "
                                         f"or use another --checkpoint-dir") from e
            self.restored_from = self.latest
            loop.steps_done = int(loop.engine.steps.numpy())
        self.saved_at = loop.steps_done

    def on_call_end(self, loop, logs) -> None:
        if loop.steps_done // self.every_steps > self.saved_at // self.every_steps:
            self.save(loop)

    def on_train_end(self, loop) -> None:
        if self.saved_at != loop.steps_done:
            self.save(loop)

    def save(self, loop) -> None:
        self.manager.save(checkpoint_number=loop.steps_done)
        self.saved_at = loop.steps_done
