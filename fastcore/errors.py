"""The faults fastcore reports, each as an exception whose message is the one line a user needs.

The CLI maps them to exit codes: UsageError / DataError / CheckpointMismatch -> 2, PreflightError and a
failed verify -> 1, NonFiniteError -> 3.
"""
from __future__ import annotations

from pipelines.errors import DataError  # noqa: F401 (re-exported: bad or missing data files)


class FastcoreError(Exception):
    """Base of fastcore's own errors; str(e) is one line naming the problem and the fix."""


class UsageError(FastcoreError, ValueError):
    """An argument or flag value the run cannot honour; the message names it and the fix."""


class CheckpointMismatch(FastcoreError):
    """The checkpoint to resume from was written by a run with another model, optimizer, data or precision."""


class PreflightError(FastcoreError):
    """Before training, the compiled step and its eager twin disagreed on the first batch (see `report`)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class NonFiniteError(FastcoreError):
    """A loss or gradient became NaN/Inf; that step's update (and any after it) was not applied.

    `summary` is the run's summary so far (also written to summary.json when the run has a directory).
    """

    def __init__(self, step: int, last_good_checkpoint: str | None = None, summary: dict | None = None):
        super().__init__(f"the loss or a gradient was NaN/Inf at step {step}; no update from it was applied; "
                         f"last good checkpoint: {last_good_checkpoint or 'none saved yet'}")
        self.step, self.last_good_checkpoint, self.summary = step, last_good_checkpoint, summary
