"""A run's options as frozen records, validated once (type and range of every field, one line each, before
anything is built); fields marked IDENTITY make a run that run.

A resumed run must be the same run: its identity (written into every checkpoint, compared on resume) is
derived from the fields marked IDENTITY here rather than listed by hand, so a new option that changes what
a step computes is added once, with its mark.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Mapping
from typing import Any, TextIO

from fastcore.engine.precision import CHOICES as PRECISIONS
from fastcore.errors import UsageError

IDENTITY = {"identity": True}
MODES = ("auto", "xla", "graph", "eager")
# The most optimizer steps one compiled call takes by default (the CLI's tasks too; here, not in the engine, so
# --help reads it without TensorFlow). A compiled call costs about 1-2.5 ms beside its steps (XLA:CPU launch,
# fresh output buffers, the stream's element): MNIST MLP, batch 32, XLA, fed by its stream, 2-core Xeon,
# interleaved in one process: K=125 (the cap 128 lets 1,875 steps per epoch have it) 1.11-1.18x the examples/s
# of K=25 (the largest divisor under the former cap, 64); text_conv, graph, K=78 vs 39: 0.99-1.02x (a slow step
# leaves nothing to amortize).
MAX_STEPS_PER_CALL = 128


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How a Trainer compiles and checks its step (see fastcore.Trainer for each field)."""
    precision: str = "float32"
    mode: str = "auto"
    steps_per_call: int | None = None   # K; the identity holds the K in use (resolved from the data)
    seed: int = dataclasses.field(default=0, metadata=IDENTITY)
    preflight: bool = True
    max_shapes: int = 8

    def __post_init__(self):
        one_of("precision", self.precision, PRECISIONS)
        one_of("mode", self.mode, MODES)
        positive("steps_per_call", self.steps_per_call, optional=True)
        # keras.utils.set_random_seed and numpy take 0 <= seed < 2**32
        if not _integer(self.seed) or not 0 <= self.seed < 2**32:
            raise UsageError(f"seed={self.seed!r} must be an integer from 0 to 4294967295")
        flag("preflight", self.preflight)
        positive("max_shapes", self.max_shapes)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """One run of `Trainer.fit` / `Trainer.run`: length, files, observation, and the caller's extras.

    summary_head: fields put at the head of summary.json; identity: extra fields that make this run this
    run (a resume with any of them changed is refused); train_source: how to name the training data; out:
    where progress lines go (default stdout). The CLI sets these; a library user may too."""
    epochs: int | None = 1
    steps: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = dataclasses.field(default=None, metadata=IDENTITY)
    validation_batch_size: int | None = None
    validation_steps: int | None = None   # evaluation batches per epoch (needed for an endless dataset)
    run_dir: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    profile_steps: str | None = None
    summary_every: int | None = None
    deterministic: bool = False
    verbose: bool = True
    out: TextIO | None = None
    summary_head: Mapping[str, Any] | None = None
    identity: Mapping[str, Any] | None = None
    train_source: str | None = None

    @property
    def checkpoint_folder(self) -> str | None:
        """checkpoint_dir, or <run_dir>/checkpoints when only run_dir is given; None: no checkpoints."""
        return self.checkpoint_dir or (os.path.join(self.run_dir, "checkpoints") if self.run_dir else None)

    def __post_init__(self):
        positive("epochs", self.epochs, optional=self.steps is not None)
        for name in ("steps", "steps_per_epoch", "batch_size", "validation_batch_size", "validation_steps",
                     "checkpoint_every", "summary_every"):
            positive(name, getattr(self, name), optional=True)
        for name in ("run_dir", "checkpoint_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise UsageError(f"{name}={value!r} must be a folder path (a str) or None")
        for name in ("profile_steps", "train_source"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UsageError(f"{name}={getattr(self, name)!r} must be a str or None")
        for name in ("resume", "deterministic"):
            flag(name, getattr(self, name))
        one_of("verbose", self.verbose, (True, False, 2, "auto"))   # as Keras' 0/1/2/"auto" (0 == False)
        for name in ("summary_head", "identity"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Mapping):
                raise UsageError(f"{name}={getattr(self, name)!r} must be a dict or None")
        if self.out is not None and not hasattr(self.out, "write"):
            raise UsageError(f"out={self.out!r} must be a text stream (with .write) or None")


def positive(name: str, value, optional: bool = False) -> None:
    """Refuse `value` (in one line naming `name`) unless it is a positive integer, or None when `optional`."""
    if value is None and optional:
        return
    if not _integer(value) or value <= 0:
        raise UsageError(f"{name}={value!r} must be a positive integer" + (" or None" if optional else ""))


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name}={value!r} must be True or False")


def one_of(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise UsageError(f"{name}={value!r}: choose one of {', '.join(map(repr, choices))}")


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def identity_fields(*records, **resolved) -> dict:
    """{field: value} for every IDENTITY field of `records`; `resolved` gives the value in use where a field
    was left to fastcore (batch_size=None -> the dataset's), and adds fields that have no option."""
    out = {}
    for record in records:
        for field in dataclasses.fields(record):
            if field.metadata.get("identity"):
                out[field.name] = getattr(record, field.name)
    out.update(resolved)
    return out
