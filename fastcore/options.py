"""A run's options as frozen records, validated once; fields marked IDENTITY make a run that run.

A resumed run must be the same run: its identity (written into every checkpoint, compared on resume) is
derived from the fields marked IDENTITY here rather than listed by hand, so a new option that changes what
a step computes is added once, with its mark.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, TextIO

from fastcore.errors import UsageError

IDENTITY = {"identity": True}
MODES = ("xla", "graph", "eager")


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How a Trainer compiles and checks its step (see fastcore.Trainer for each field)."""
    precision: str = "float32"
    mode: str = "xla"
    steps_per_call: int | None = None   # K; the identity holds the K in use (resolved from the data)
    seed: int = dataclasses.field(default=0, metadata=IDENTITY)
    preflight: bool = True
    max_shapes: int = 8

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.steps_per_call is not None and self.steps_per_call <= 0:
            raise UsageError(f"steps_per_call={self.steps_per_call} must be positive")
        if self.max_shapes <= 0:
            raise UsageError(f"max_shapes={self.max_shapes} must be positive")


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
        if self.steps is not None and self.steps <= 0:
            raise UsageError(f"steps={self.steps} must be positive")
        if self.steps is None and (self.epochs is None or self.epochs <= 0):
            raise UsageError(f"epochs={self.epochs} must be positive")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise UsageError(f"checkpoint_every={self.checkpoint_every} must be positive")


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
