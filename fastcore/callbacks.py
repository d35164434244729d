"""The hooks the training loop calls: progress, TensorBoard, checkpoints and user callbacks subclass `Callback`.

A leaf module (imports nothing of fastcore), so the engine and observation can both use it without
importing each other.
"""
from __future__ import annotations


class Callback:
    """Override any hook; `loop` is the running `fastcore.engine.loop.Loop` (steps_done, epoch, meter...)."""

    def on_train_begin(self, loop) -> None:
        """Before the first call (after a resume has restored the state)."""

    def on_epoch_begin(self, loop) -> None:
        """Before the first call of an epoch (`loop.epoch_index` is its 0-based number)."""

    def on_call_begin(self, loop) -> None:
        """Before a compiled call's batch is fetched."""

    def on_call_end(self, loop, logs: dict) -> None:
        """After a compiled call of K steps; `logs` maps names to the call's mean values (tensors, unread)."""

    def on_epoch_end(self, loop, logs: dict) -> None:
        """After an epoch's evaluation; `logs` holds floats (train_<name>, eval_<name>, epoch, steps)."""

    def on_train_end(self, loop) -> None:
        """After the last call (not called when the run stops on an error)."""
