"""Checkpoints: every model's variables, every optimizer, the step counters, the data iterator, and what
makes the run the run it is (its identity) with its history so far.

Saved with tf.train.Checkpoint through a CheckpointManager (keeps the last few). A save writes its files
first and only then rewrites the `checkpoint` index (atomically), so a crash during a save leaves the
previous checkpoint the latest usable one. Promises, each tested (tests/test_faults.py):
  - a checkpoint is never written holding a NaN/Inf (the weights checked in-graph per call; every variable
    it saves, moving statistics and optimizer state included, here);
  - resume refuses a run that differs (data, splits, batch, seed, steps per call, model, optimizer,
    precision), naming each field old -> new; only the length (epochs, steps) may change;
  - a damaged newest checkpoint is named and the newest intact one is used; a garbage index file is
    rebuilt from the checkpoint files on disk, so rotation never deletes an intact checkpoint;
  - a failed save (disk full) removes its temp files, keeps the previous checkpoint, and says so.
"""
from __future__ import annotations

import atexit
import fnmatch
import glob
import json
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from fastcore.callbacks import Callback
from fastcore.errors import CheckpointMismatch

PRECISION_KEY = "precision/.ATTRIBUTES/VARIABLE_VALUE"
IDENTITY_KEY = "identity/.ATTRIBUTES/VARIABLE_VALUE"
HISTORY_KEY = "history/.ATTRIBUTES/VARIABLE_VALUE"
STEPS_KEY = "steps/.ATTRIBUTES/VARIABLE_VALUE"
_NUMBERED = re.compile(r"ckpt-(\d+)\.index$")


def on_disk(directory: str) -> list[str]:
    """Checkpoint prefixes (`<dir>/ckpt-N`) whose index file exists, newest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index")):
        match = _NUMBERED.search(path)
        if match:
            found.append((int(match.group(1)), path[:-len(".index")]))
    return [prefix for _, prefix in sorted(found, reverse=True)]


def repair_state(directory: str) -> str | None:
    """Rewrite the `checkpoint` index from the files on disk when it is unreadable or lists none of them.

    Returns a one-line note when it did. Without this, a garbage index reads as "no checkpoint": the run
    restarted from step 0 and rotation deleted the intact checkpoints.
    """
    prefixes = on_disk(directory)
    if not prefixes:
        return None
    try:
        state = tf.train.get_checkpoint_state(directory)
        listed = list(state.all_model_checkpoint_paths) if state else []
    except Exception:   # a garbage or truncated index: protobuf text parse errors of several kinds
        listed = []
    if any(os.path.exists(p + ".index") for p in listed):
        return None
    from tensorflow.python.checkpoint import checkpoint_management
    checkpoint_management.update_checkpoint_state_internal(
        directory, prefixes[0], all_model_checkpoint_paths=list(reversed(prefixes)), save_relative_paths=True)
    return f"the checkpoint index in {directory!r} was unreadable; rebuilt it from {len(prefixes)} checkpoint files"


def read_meta(prefix: str) -> dict:
    """Precision, identity, history and step of one checkpoint; raises if its files are damaged."""
    reader = tf.train.load_checkpoint(prefix)
    meta = {"steps": int(reader.get_tensor(STEPS_KEY))}
    for key, name in ((PRECISION_KEY, "precision"), (IDENTITY_KEY, "identity"), (HISTORY_KEY, "history")):
        if reader.has_tensor(key):
            value = reader.get_tensor(key).decode()
            meta[name] = json.loads(value) if name != "precision" else value
    return meta


def recorded_precision(directory: str) -> str | None:
    """The precision of the newest readable checkpoint in `directory` (None: none)."""
    for prefix in on_disk(directory):
        try:
            return read_meta(prefix).get("precision")
        except Exception:
            continue
    return None


def differences(old: dict, new: dict) -> list[str]:
    """`field old -> new` for every field of the run's identity that changed (nested keys joined by '.')."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [f"{key} {flat_old.get(key, '(none)')} -> {flat_new.get(key, '(none)')}"
            for key in sorted(set(flat_old) | set(flat_new)) if flat_old.get(key) != flat_new.get(key)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_run(prefix: str, meta: dict, precision: str, identity: dict) -> None:
    """Raise CheckpointMismatch unless the checkpoint was written by this run (same precision and identity)."""
    written_in = meta.get("precision")
    if written_in != precision:   # float32 variables fit any policy: restore would not notice
        raise CheckpointMismatch(f"cannot resume from {prefix!r}: it was trained in {written_in}, this run "
                                 f"is {precision}; resume with --precision {written_in} (or auto)")
    changed = differences(meta.get("identity", {}), identity)
    if changed:
        raise CheckpointMismatch(f"cannot resume from {prefix!r}: this is not the same run: "
                                 f"{'; '.join(changed)}; only the length (epochs, steps) may change on resume")


class Checkpoints(Callback):
    """Saves every `every_steps` steps (at the next call end) and at the end; restores on resume.

    `with_data=False` leaves the data iterator out (a pipeline whose position cannot be saved): a resumed
    run then restarts its data from the beginning. `say` prints a one-line note (damage, a failed save).
    `writer=False` (a multi-worker run's non-chief workers): saves go to one private temp folder (mkdtemp,
    kept for the run and emptied after each save, so no known path is ever re-created), as tf.distribute
    asks every worker to save; restores read `directory` (the chief's).
    """

    def __init__(self, directory: str, every_steps: int, resume: bool, precision: str, identity: dict,
                 keep: int = 3, with_data: bool = True, say=print, writer: bool = True):
        self.directory, self.every_steps, self.resume, self.keep = directory, every_steps, resume, keep
        self.precision, self.identity, self.with_data, self.say = precision, identity, with_data, say
        self.restored_from: str | None = None
        self.restored_step: int | None = None
        self.previous_history: list[dict] = []
        self.failed_saves: list[str] = []
        self.writer = writer

    def attach(self, loop) -> None:
        engine = loop.engine
        # Model variables as lists: Keras 3 models are not tracked as checkpoint children, and a list
        # also covers a Keras-free tf.Module (weights and RNG state alike).
        parts = {"models": {name: list(m.variables) for name, m in engine.models.items()},
                 "optimizers": {name: opt for name, opt in engine.optimizers.items()
                                if isinstance(opt, tf.__internal__.tracking.Trackable)}}
        if self.with_data:
            parts["data"] = loop.iterator
        self.history_variable = tf.Variable("[]", trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            steps=engine.steps, applied=engine.applied, precision=tf.Variable(self.precision, trainable=False),
            identity=tf.Variable(json.dumps(self.identity, sort_keys=True), trainable=False),
            history=self.history_variable, **parts)
        target = self.directory
        if not self.writer:
            target = tempfile.mkdtemp(prefix="fastcore-worker-checkpoint-")
            atexit.register(shutil.rmtree, target, True)   # a run that ends by an exception leaves nothing
        self.manager = tf.train.CheckpointManager(self.checkpoint, target, max_to_keep=self.keep)

    @property
    def latest(self) -> str | None:
        if not self.writer:
            newest = on_disk(self.directory)
            return newest[0] if newest else None
        return self.manager.latest_checkpoint

    def on_train_begin(self, loop) -> None:
        if self.writer and os.path.isdir(self.directory):   # the run holds its lock on the folder (engine/run.py)
            remove_stale_temps(self.directory)
        note = repair_state(self.directory) if os.path.isdir(self.directory) else None
        if note:
            self.say(note)
        self.attach(loop)
        if self.resume:
            self.restore(loop)
        self.saved_at = loop.steps_done

    def restore(self, loop) -> None:
        damaged = []
        for prefix in on_disk(self.directory):
            try:
                meta = read_meta(prefix)
            except Exception as e:
                damaged.append(f"{os.path.basename(prefix)} ({_first_line(e)})")
                continue
            check_same_run(prefix, meta, self.precision, self.identity)
            try:
                self.checkpoint.restore(prefix).assert_consumed()
            except (AssertionError, ValueError) as e:
                raise CheckpointMismatch(f"cannot resume from {prefix!r}: it does not match this run "
                                         f"({_first_line(e)}); resume with the flags of the run that wrote it, "
                                         f"or use another --checkpoint-dir") from None
            except Exception as e:   # damaged data file: checksum, truncation
                damaged.append(f"{os.path.basename(prefix)} ({_first_line(e)})")
                continue
            if damaged:
                self.say(f"damaged checkpoint(s) skipped: {'; '.join(damaged)}; resuming from the newest intact "
                         f"one, {os.path.basename(prefix)}")
            self.restored_from, self.restored_step = prefix, meta["steps"]
            self.previous_history = [h for h in meta.get("history", []) if h.get("steps", 0) <= meta["steps"]]
            loop.steps_done = int(loop.engine.steps.numpy())
            return
        if damaged:
            raise CheckpointMismatch(f"cannot resume: every checkpoint in {self.directory!r} is damaged "
                                     f"({'; '.join(damaged)}); start again with another --checkpoint-dir")

    def on_call_end(self, loop, logs) -> None:
        if self._due(loop) and not loop.ending_epoch:
            self.save(loop)

    def on_epoch_end(self, loop, logs) -> None:
        if self._due(loop):   # after the epoch's evaluation, so the checkpoint's history includes it
            self.save(loop)

    def _due(self, loop) -> bool:
        return loop.steps_done // self.every_steps > self.saved_at // self.every_steps

    def on_train_end(self, loop) -> None:
        if self.saved_at != loop.steps_done:
            self.save(loop)
        if not self.writer:
            shutil.rmtree(self.manager.directory, ignore_errors=True)

    def save(self, loop) -> None:
        """Save now, unless a variable is not finite (never a bad checkpoint) or the disk refuses (said once)."""
        bad = not_finite(loop.engine.state_variables)
        if bad:
            line = (f"checkpoint at step {loop.steps_done} not written: {bad} is NaN/Inf; "
                    f"{self.latest or 'no earlier checkpoint'} stays the latest")
            self.failed_saves.append(line)
            self.say(line)
            self.saved_at = loop.steps_done   # tried at this step (a disk failure counts so too): once
            return
        self.history_variable.assign(json.dumps(self.previous_history + loop.history))
        try:
            self.manager.save(checkpoint_number=loop.steps_done)
        except (tf.errors.OpError, OSError) as e:
            folder = glob.escape(self.directory)
            for leftover in (glob.glob(os.path.join(folder, f"ckpt-{loop.steps_done}.*")) +
                             glob.glob(os.path.join(folder, f"ckpt-{loop.steps_done}_temp*"))):
                shutil.rmtree(leftover, ignore_errors=True) if os.path.isdir(leftover) else os.remove(leftover)
            line = (f"checkpoint at step {loop.steps_done} not written ({_first_line(e)}); "
                    f"{self.latest or 'no earlier checkpoint'} stays the latest")
            self.failed_saves.append(line)
            self.say(line)
        if not self.writer:
            _empty(self.manager.directory)
        self.saved_at = loop.steps_done


def not_finite(variables) -> str | None:
    """The name of the first floating-point variable holding a NaN/Inf (None: every one is finite)."""
    for v in variables:
        if tf.as_dtype(v.dtype).is_floating and not np.isfinite(np.asarray(v.numpy(), np.float32)).all():
            return getattr(v, "path", None) or v.name
    return None


def remove_stale_temps(directory: str) -> None:
    """Remove the `ckpt-N_temp` folders a save killed midway (SIGKILL) left in `directory`; a symlink is
    unlinked, never followed."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if fnmatch.fnmatch(entry.name, "ckpt-*_temp*"):
                _remove(entry)


def _empty(directory: str) -> None:
    with os.scandir(directory) as entries:
        for entry in entries:
            _remove(entry)


def _remove(entry: os.DirEntry) -> None:
    try:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)   # fd-based on Linux: never follows a symlink inside
        else:
            os.unlink(entry.path)
    except FileNotFoundError:
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]
