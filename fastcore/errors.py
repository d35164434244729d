"""The faults fastcore reports, each as an exception whose message is the one line a user needs.

The CLI maps them to exit codes: UsageError / DataError / CheckpointMismatch -> 2, PreflightError and a
failed verify -> 1, NonFiniteError -> 3, PeerLost -> 4, Interrupted -> 130 (SIGINT) / 143 (SIGTERM).
"""
from __future__ import annotations

import re

from pipelines.errors import DataError  # noqa: F401 (re-exported: bad or missing data files)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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


class Interrupted(FastcoreError):
    """SIGINT or SIGTERM stopped the run after the compiled call in flight (a checkpoint was saved), or before
    the first call when it arrived earlier (`during`, e.g. the pre-flight).

    `signal` is "SIGINT" or "SIGTERM", `exit_code` 130 or 143, `summary` the run's summary (marked interrupted).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: str | None, exit_code: int, summary: dict | None = None,
                 during: str | None = None):
        if during:   # before the loop's first call, e.g. in the pre-flight: nothing was trained
            kept = f"the newest checkpoint is {checkpoint!r}" if checkpoint else "no checkpoint was written"
            super().__init__(f"stopped by {signal_name} during {during}, before step {step + 1}; {kept}")
        else:
            kept = f"checkpoint {checkpoint!r}; continue with --resume" if checkpoint else "no checkpoint (none configured)"
            super().__init__(f"stopped by {signal_name} at step {step}; {kept}")
        self.signal, self.step, self.checkpoint, self.exit_code, self.summary = (
            signal_name, step, checkpoint, exit_code, summary)


class NonFiniteError(FastcoreError):
    """A loss or gradient became NaN/Inf; that step's update (and any after it) was not applied.

    `summary` is the run's summary so far (also written to summary.json when the run has a directory).
    """

    def __init__(self, step: int, last_good_checkpoint: str | None = None, summary: dict | None = None):
        super().__init__(f"the loss, a gradient or an updated weight was NaN/Inf at step {step}; no checkpoint was "
                         f"written after it; last good checkpoint: {repr(last_good_checkpoint) if last_good_checkpoint else 'none saved yet'}")
        self.step, self.last_good_checkpoint, self.summary = step, last_good_checkpoint, summary


class PeerLost(FastcoreError):
    """Under tf.distribute, another worker failed, was killed or did not answer within the timeout; the run
    stopped. The last checkpoint (written before the fault) is intact: `--resume` continues from it."""

    def __init__(self, cause: str, step: int, checkpoint: str | None):
        where = f"last checkpoint {checkpoint!r}; continue with --resume" if checkpoint else "no checkpoint saved yet"
        super().__init__(f"a worker was lost at step {step} ({cause}); {where}")
        self.cause, self.step, self.checkpoint = cause, step, checkpoint


def gist(error: BaseException) -> str:
    """The line of an error that says what is wrong, without ANSI escapes: Keras wraps a layer's refusal
    between "Exception encountered when calling ..." and the arguments it got, in bold; those are left out."""
    for line in _ANSI.sub("", str(error)).splitlines():
        line = line.strip()
        if line.startswith("Arguments received by"):
            break
        if line and not line.startswith("Exception encountered when calling"):
            return line
    return type(error).__name__


def no_gradient(optimizer: str) -> UsageError:
    """The refusal of a step whose every gradient for `optimizer` is None (nothing would ever train)."""
    return UsageError(f"the step has no gradient for any variable of optimizer {optimizer!r} (each is None): the "
                      f"loss does not depend on them (a tf.stop_gradient, an integer cast, or a value computed "
                      f"outside the GradientTape)")
