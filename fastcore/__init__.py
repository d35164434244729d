"""fastcore: compiled, checked training steps for TensorFlow 2 custom training loops.

    import fastcore
    trainer = fastcore.Trainer(model, optimizer, loss=loss)            # or step=your_step_function
    result = trainer.fit(x, y, batch_size=32, epochs=5, validation_data=(xv, yv), run_dir="profiles/run")
    report = trainer.verify(x, y, steps=20)                             # the eager reference twin

Public names: Trainer, FitResult, Update (what a step function returns), StepContext (what it gets),
Callback, the errors (FastcoreError, UsageError, DataError, PreflightError, NonFiniteError,
CheckpointMismatch, Interrupted, PeerLost), and the modules `fastcore.layers` and `fastcore.random` (randomness
identical compiled and eager) and `fastcore.distribute` (a tf.distribute strategy for `Trainer(strategy=...)`) and `fastcore.threads` (the
intra-op thread count chosen by timing the user's own step, before TensorFlow starts).
Names load on first use, so `python -m fastcore.train --help` starts without importing TensorFlow.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "Trainer": "fastcore.trainer", "FitResult": "fastcore.trainer",
    "Update": "fastcore.engine.step", "StepContext": "fastcore.engine.step",
    "Callback": "fastcore.callbacks",
    "FastcoreError": "fastcore.errors", "UsageError": "fastcore.errors", "DataError": "fastcore.errors",
    "PreflightError": "fastcore.errors", "NonFiniteError": "fastcore.errors", "CheckpointMismatch": "fastcore.errors",
    "Interrupted": "fastcore.errors", "PeerLost": "fastcore.errors",
    "layers": None, "random": None, "distribute": None, "threads": None,
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fastcore' has no attribute {name!r}")
    module = _PUBLIC[name]
    value = importlib.import_module(f"fastcore.{name}") if module is None else getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
