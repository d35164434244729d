"""One compiled, guarded step on a batch the caller just made: loops that produce their own data.

fit() owns a data stream; reinforcement learning, active learning and curricula make each batch between
updates. For them the training call itself is the API: one call of the engine's compiled step (no
rebuild, no retrace for a batch of the same shape), with the finiteness guard, float16 loss scaling and
the step counter, and the run's checkpoint saved or restored on request.
"""
from __future__ import annotations

import dataclasses
import os

from fastcore.engine import checkpoint, input_checks
from fastcore.errors import NonFiniteError, UsageError


@dataclasses.dataclass
class _Position:
    """What fastcore.engine.checkpoint.Checkpoints reads from a loop, for steps taken one call at a time."""
    engine: object
    steps_done: int = 0
    history: list = dataclasses.field(default_factory=list)
    iterator: object = None


class OnlineSteps:
    """Calls the engine's compiled one-step function on each batch given; `save`/`restore` the models,
    optimizers and counter. `build(batch) -> (engine, precision name, identity)` builds the engine on the
    first batch (or returns the one fit built); a restore asked for before that waits for it."""

    def __init__(self, build):
        self._build = build
        self.engine = None
        self._pending: str | None = None
        self._checkpoints: dict[str, checkpoint.Checkpoints] = {}

    def __call__(self, batch) -> dict[str, float]:
        if self.engine is None:
            self.engine, self.precision, self.identity = self._build(batch)
            if self._pending:
                self.restore(self._pending)
        logs = self.engine.train_one(batch)
        bad = int(self.engine.first_non_finite_step.numpy())   # the one read per call (the guard's verdict)
        if bad >= 0:   # a label the loss cannot take is bad input, not a NaN (XLA gives NaN where kernels refuse)
            input_checks.labels_of_call(self.engine, batch, 1, bad)
            raise NonFiniteError(bad)
        return {name: float(value) for name, value in logs.items()}

    @property
    def steps(self) -> int:
        return int(self.engine.steps.numpy())

    def _manager(self, directory: str, resume: bool) -> tuple[checkpoint.Checkpoints, _Position]:
        if self.engine is None:   # fit built the engine, or nothing did
            self.engine, self.precision, self.identity = self._build(None)
        position = _Position(self.engine, self.steps)
        if directory not in self._checkpoints:
            saver = checkpoint.Checkpoints(directory, every_steps=1, resume=resume, precision=self.precision,
                                           identity=self.identity, with_data=False, say=lambda line: None)
            saver.attach(position)
            self._checkpoints[directory] = saver
        return self._checkpoints[directory], position

    def save(self, directory: str) -> str:
        """Write a checkpoint of the current step into `directory` (kept: the newest 3); returns its path."""
        saver, position = self._manager(directory, resume=False)
        saver.save(position)
        if saver.failed_saves:
            raise UsageError(saver.failed_saves.pop())
        return saver.latest

    def restore(self, directory: str) -> int:
        """Load the newest intact checkpoint in `directory` (refused in one line if it is another run's);
        returns the step it holds. Before the first step it is loaded once the step is built (on the next
        call), and the step is read from the checkpoint's record."""
        found = checkpoint.on_disk(directory)
        if not found:
            raise UsageError(f"no checkpoint in {os.fspath(directory)!r} to restore")
        try:
            saver, position = self._manager(directory, resume=True)
        except NothingBuilt:
            self._pending = directory
            return int(checkpoint.read_meta(found[0])["steps"])
        saver.restore(position)
        self._pending = None
        return self.steps


class NothingBuilt(Exception):
    """`build(None)`: no batch has been seen and fit built nothing, so there is no engine yet."""
