"""User data -> what a compiled step needs: fixed-shape batches, K per call, repeated, prefetched.

Two kinds of input:
  - numpy arrays (x, y): the in-memory fast path (pipelines.train_stream: data held in variables, one
    gather per batch, a stateless per-epoch shuffle; the iterator is checkpointable);
  - any tf.data.Dataset of batches (tuples, dicts or single tensors, streamed from files or not).
Everything that would otherwise fail late is checked here, before the first step: an unknown epoch
length, a pipeline whose position cannot be checkpointed (said once; checkpoints then hold weights and
optimizer only). Dimensions other than the batch may vary (text padded per batch, or bucketed): the step
compiles once per shape, up to the engine's `max_shapes` (fastcore.engine.step.TraceLedger), and the K
batches of one call are K consecutive batches of one shape (`stacked_calls`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

import pipelines
from fastcore.errors import UsageError
from fastcore.options import MAX_STEPS_PER_CALL, positive

PREFETCH = 2   # compiled calls' batches ready ahead (see pipelines.common for the measurements)
CALL_EXAMPLES = 8192   # default steps per call: about this many examples per compiled call, at most
# fastcore.options.MAX_STEPS_PER_CALL steps (progress and checkpoints stay timely).
# With varying shapes each shape's window holds up to K-1 batches until its call is full (stacked_calls):
# 8 keeps that buffer small and measured 3.4-4.2x the examples/s of K=1 (see stacked_calls).
VARYING_STEPS_PER_CALL = 8


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def steps_per_call(batch_size: int, steps_per_epoch: int, requested: int | None = None, varying: bool = False,
                   most: int = MAX_STEPS_PER_CALL) -> int:
    """K, the optimizer steps per compiled call: `requested`, else about CALL_EXAMPLES examples (at most
    `most` steps, VARYING_STEPS_PER_CALL when the data's shapes vary) and a divisor of the epoch, so epoch
    ends fall on call ends."""
    if requested:
        return requested
    target = max(1, min(most, CALL_EXAMPLES // batch_size))
    if varying:
        target = min(target, VARYING_STEPS_PER_CALL)
    return largest_divisor_at_most(steps_per_epoch, target)


@dataclasses.dataclass
class Feed:
    """An infinite stream of training calls: each element one batch, or K stacked when steps_per_call > 1."""
    dataset: tf.data.Dataset
    batch_size: int
    steps_per_epoch: int
    source: str
    fingerprint: str            # what the data is, for a resume's same-run check (see fingerprint())
    user_dataset: tf.data.Dataset | None = None   # the dataset as given (None for arrays): its first batch is hashed
    varying: tuple[str, ...] = ()   # the dimensions whose size varies from batch to batch (see varying_dims)
    labels: object = None           # the label arrays (arrays given), for checks before the first step


def is_dataset(data) -> bool:
    return isinstance(data, tf.data.Dataset)


def _arrays(x, y, source: str, sample_weight=None, what: str = "training") -> pipelines.Arrays:
    """Arrays from numpy x, y (each an array, or a dict / list of them: several inputs or outputs) and
    optional sample weights (one [N] array, or one per output); float64 becomes float32. Arrays numpy
    cannot hold as numbers of one shape (ragged rows, Python objects) are refused here, in one line."""
    if y is None:
        raise UsageError(f"numpy {what} data needs both x and y (a dataset carries its own labels)")

    def array(a, name):
        try:
            a = np.asarray(a)
        except ValueError as e:   # numpy >= 1.24: rows of different lengths
            raise UsageError(f"the {what} {name} cannot be one numpy array ({str(e).splitlines()[0]}): pad its "
                             f"rows to one length") from None
        if a.ndim == 0:
            raise UsageError(f"the {what} {name} holds a single value where an array of examples belongs (a Python "
                             f"list is read as one entry per model input): give a numpy array, e.g. "
                             f"np.asarray(rows, np.float32)")
        if a.dtype == object:
            raise UsageError(f"the {what} {name} has dtype object (rows of different lengths, or mixed types): "
                             f"give a numeric numpy array, its rows padded to one length")
        return a.astype(np.float32) if a.dtype == np.float64 else a
    x, y = (tf.nest.map_structure(lambda a: array(a, name), v) for name, v in (("x", x), ("y", y)))
    if sample_weight is not None:
        sample_weight = tf.nest.map_structure(lambda a: np.asarray(a, np.float32), sample_weight)
    counts = {what: {len(a) for a in tf.nest.flatten(v)} for what, v in
              (("x", x), ("y", y), ("sample_weight", sample_weight)) if v is not None}
    if any(len(c) > 1 for c in counts.values()) or len(set().union(*counts.values())) > 1:
        said = ", ".join(f"{what} {'/'.join(map(str, sorted(c)))}" for what, c in counts.items())
        raise UsageError(f"the arrays hold different numbers of examples ({said}): they must match")
    return pipelines.Arrays(x=x, y=y, source=source, sample_weight=sample_weight)


def training_feed(x, y=None, *, batch_size: int | None, steps_per_call: int, seed: int,
                  steps_per_epoch: int | None = None, source: str | None = None, sample_weight=None) -> Feed:
    """A Feed from arrays (x, y[, sample_weight]) or from a dataset of batches `x` (then y must be None)."""
    positive("batch_size", batch_size, optional=True)
    positive("steps_per_epoch", steps_per_epoch, optional=True)
    if is_dataset(x):
        if y is not None:
            raise UsageError("y must be None when x is a tf.data.Dataset: its elements carry the labels")
        if sample_weight is not None:
            raise UsageError("sample_weight is for numpy arrays: a dataset carries its own, as (x, y, sample_weight)")
        return _dataset_feed(x, batch_size, steps_per_call, steps_per_epoch, source or "tf.data.Dataset")
    data = x if isinstance(x, pipelines.Arrays) else _arrays(x, y, source or "numpy arrays", sample_weight)
    batch_size = batch_size or 32
    if not len(data):
        raise UsageError("the training arrays hold no examples")
    if batch_size > len(data):
        raise UsageError(f"batch size {batch_size} is larger than the {len(data)} training examples: "
                         f"use at most {len(data)}")
    per_epoch = steps_per_epoch or len(data) // batch_size
    stream = pipelines.train_stream(data, batch_size, seed, steps_per_call)
    return Feed(stream, batch_size, per_epoch, data.source, fingerprint(data), labels=data.y)


def batch_feed(batch) -> Feed:
    """A Feed that repeats one batch: what builds the engine for steps on batches the caller makes."""
    size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
    ds = tf.data.Dataset.from_tensors(batch).repeat()
    return Feed(ds, size, 1, "batches given one at a time", f"one-step batches {ds.element_spec}")


def _dataset_feed(ds: tf.data.Dataset, batch_size, steps_per_call, steps_per_epoch, source) -> Feed:
    given = ds
    dim = check_shapes(ds.element_spec, "training")
    if dim is None:   # the last batch may be short: keep the full ones so every step has one shape
        dim = batch_size or first_batch_size(ds)
        ds = fixed_batches(ds, dim)
        cardinality = None
        batches = int(given.cardinality())
        if steps_per_epoch is None and batches > 0:   # known, but how many of them are full is not
            raise UsageError(f"the training dataset's batches have no fixed size (a short last batch, or bucketing), "
                             f"so its number of full batches per epoch is unknown: pass steps_per_epoch (at most "
                             f"{batches}), or batch with drop_remainder=True")
    else:
        if batch_size and batch_size != dim:
            raise UsageError(f"batch_size={batch_size} but the dataset's batches hold {dim}: "
                             f"leave batch_size out (the dataset is already batched)")
        cardinality = int(ds.cardinality())
    if steps_per_epoch is None:
        if cardinality is None or cardinality < 0:
            kind = "infinite" if cardinality == tf.data.INFINITE_CARDINALITY else "of unknown length"
            raise UsageError(f"the training dataset is {kind}: pass steps_per_epoch (or batch it with "
                             f"drop_remainder=True / assert_cardinality so its length is known)")
        steps_per_epoch = cardinality
    if steps_per_epoch <= 0:
        raise UsageError("the training dataset holds no full batch: it is empty or smaller than one batch")
    varying = varying_dims(ds.element_spec)
    ds = stacked_calls(ds.repeat(), steps_per_call, bool(varying))
    described = f"{source}; {ds.element_spec}; {steps_per_epoch} batches of {dim} per epoch"
    return Feed(ds.prefetch(PREFETCH), dim, steps_per_epoch, source, described, user_dataset=given, varying=varying)


SAMPLED_ROWS = 256


def fingerprint(data: pipelines.Arrays) -> str:
    """Shapes, dtypes and a hash of 256 rows spread over the arrays: another split, another file or edited
    rows change it. Reads 256 rows, not the data (HIGGS 9.9k x 28: 0.1 ms; 11M rows: the same)."""
    import hashlib
    digest = hashlib.blake2b(digest_size=8)
    for a in tf.nest.flatten(data.columns):
        rows = np.linspace(0, len(a) - 1, min(SAMPLED_ROWS, len(a))).astype(np.int64)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(np.ascontiguousarray(a[rows]).tobytes())
    inputs = ", ".join(f"{a.shape[1:]} {a.dtype}" for a in tf.nest.flatten(data.x))
    return f"{len(data)} examples {inputs}, sampled rows {digest.hexdigest()}"


def check_shapes(spec, what: str) -> int | None:
    """The static batch size of a dataset of batches (None if it varies). Other dimensions may vary."""
    batch_dims = set()
    for path, leaf in leaves(spec):
        shape = leaf.shape
        if shape.rank is None or shape.rank == 0:
            raise UsageError(f"the {what} dataset's element {path} has shape {shape}: elements must be "
                             f"batches with a leading batch dimension (use dataset.batch(B))")
        batch_dims.add(shape[0])
    if len(batch_dims) > 1:
        raise UsageError(f"the {what} dataset's elements have different batch sizes {sorted(map(str, batch_dims))}")
    return batch_dims.pop()


def varying_dims(spec) -> tuple[str, ...]:
    """Which non-batch dimensions of a dataset's batches vary, e.g. ("element 0 dimension 1",)."""
    return tuple(f"element {path} dimension {i}" for path, leaf in leaves(spec)
                 for i, d in enumerate(leaf.shape.as_list()[1:], start=1) if d is None)


def stacked_calls(ds: tf.data.Dataset, steps_per_call: int, varying: bool) -> tf.data.Dataset:
    """K batches per element ([K, B, ...] leaves) for a K-step call. Batches of varying shapes are grouped
    by shape: each element stacks K consecutive batches of one shape (a batch waits in its shape's window).
    Measured, Embedding text model, 4 bucketed lengths, batch 32, 2 CPU cores: K=8 grouped 91-102k ex/s,
    K=1 24-27k ex/s."""
    if steps_per_call == 1:
        return ds
    if not varying:
        return ds.batch(steps_per_call, drop_remainder=True)

    def shape_key(*element):
        dims = tf.concat([tf.shape(t, out_type=tf.int64)[1:] for t in tf.nest.flatten(element)], 0)
        return tf.strings.to_hash_bucket_fast(tf.strings.reduce_join(tf.strings.as_string(dims), separator=","),
                                              2**62)
    return ds.group_by_window(shape_key, lambda _, window: window.batch(steps_per_call, drop_remainder=True),
                              window_size=steps_per_call)


def leaves(spec):
    """(name, spec) per leaf: 'x', '0', 'features' ... so a message can point at the element that is wrong."""
    if isinstance(spec, dict):
        return [(f"'{key}'", leaf) for key in sorted(spec) for _, leaf in leaves(spec[key])]
    if isinstance(spec, (tuple, list)):
        return [(f"{i}", leaf) for i, part in enumerate(spec) for _, leaf in leaves(part)]
    return [("x", spec)]


def first_batch_size(ds: tf.data.Dataset) -> int:
    for element in ds.take(1):
        return int(tf.shape(tf.nest.flatten(element)[0])[0])
    raise UsageError("the dataset is empty")


def fixed_batches(ds: tf.data.Dataset, size: int) -> tf.data.Dataset:
    """Only batches of exactly `size`, with that size in their static shape (one trace)."""
    def full(*element):
        return tf.equal(tf.shape(tf.nest.flatten(element)[0])[0], size)

    def pin(*element):
        element = element[0] if len(element) == 1 else element
        return tf.nest.map_structure(lambda t: tf.ensure_shape(t, [size] + t.shape.as_list()[1:]), element)
    return ds.filter(full).map(pin)


def eval_batches(data, y=None, *, batch_size: int | None, sample_weight=None, steps: int | None = None,
                 what: str = "evaluation") -> tf.data.Dataset:
    """(batch, weights) pairs covering every example exactly once, all of one batch size: the last batch
    is padded with copies of its own rows, weight 0. `data` is arrays (x, y[, sample_weight]) or a dataset
    of batches (y None). `steps`: only the first `steps` batches; an endless dataset is refused without it
    (its evaluation would never end)."""
    positive("batch_size", batch_size, optional=True)
    positive("steps", steps, optional=True)
    if is_dataset(data):
        batches = _padded_dataset(data, batch_size, steps is not None, what)
    else:
        arrays = data if isinstance(data, pipelines.Arrays) else _arrays(data, y, "numpy arrays", sample_weight, what)
        if not len(arrays):
            raise UsageError(f"the {what} arrays hold no examples")
        size = min(len(arrays), batch_size or max(1024, 1))

        def pair(*element):   # every batch holds `size` rows (padded): said in the spec, so a trace on it is reused
            for t in tf.nest.flatten(element):
                t.set_shape([size] + t.shape.as_list()[1:])
            return tuple(element[:-1]), element[-1]
        batches = pipelines.eval_stream(arrays, size).map(pair)
    return batches if steps is None else batches.take(steps)


COUNT_SECONDS = 60.0   # how long an evaluation dataset of unknown length may take to be counted


def _count_batches(ds: tf.data.Dataset, what: str) -> int:
    """The batches of a dataset of unknown length (files, buckets, filters: Keras takes those), counted once
    before the first step; one that has not ended within COUNT_SECONDS is refused: it may never end."""
    deadline, count = time.perf_counter() + COUNT_SECONDS, 0
    for _ in ds:
        count += 1
        if time.perf_counter() > deadline:
            raise UsageError(f"the {what} dataset, of unknown length, had not ended after {count:,} batches "
                             f"({COUNT_SECONDS:g} s): give a step count (fit's validation_steps), or end it")
    return count


def _padded_dataset(ds: tf.data.Dataset, batch_size: int | None, counted: bool, what: str) -> tf.data.Dataset:
    cardinality = int(ds.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY and not counted:
        raise UsageError(f"the {what} dataset is endless (.repeat() without a count): its evaluation would never "
                         f"end; give a step count (fit's validation_steps: batches per evaluation), or drop the "
                         f".repeat()")
    if cardinality == tf.data.UNKNOWN_CARDINALITY and not counted:
        cardinality = _count_batches(ds, what)
        ds = ds.apply(tf.data.experimental.assert_cardinality(cardinality))
    if cardinality == 0:
        raise UsageError(f"the {what} dataset holds no batches")
    dim = check_shapes(ds.element_spec, what)
    size = dim or batch_size or first_batch_size(ds)

    def pad(*element):
        element = element[0] if len(element) == 1 else element
        n = tf.shape(tf.nest.flatten(element)[0])[0]
        copies = tf.range(size - n) % n   # real rows as padding: a zero row can make NaN (see pipelines.common)
        padded = tf.nest.map_structure(
            lambda t: tf.ensure_shape(tf.concat([t, tf.gather(t, copies)], 0), [size] + t.shape.as_list()[1:]),
            element)
        weights = tf.concat([tf.ones([n]), tf.zeros([size - n])], 0)
        return padded, weights
    return ds.map(pad).prefetch(PREFETCH)


def checkpointable(iterator) -> str | None:
    """None if the iterator's position can be saved; else the first line of why not.

    Tried once up front (a save to a temp folder) so a pipeline that cannot be saved (a Python
    generator, a py_function) is known before training, not at the first checkpoint.
    """
    folder = tempfile.mkdtemp(prefix="fastcore-probe-")
    try:
        tf.train.Checkpoint(data=iterator).write(os.path.join(folder, "probe"))
        return None
    except (tf.errors.OpError, ValueError, TypeError) as e:
        text = str(e).strip().splitlines()
        return text[0][:160] if text else type(e).__name__
    finally:
        shutil.rmtree(folder, ignore_errors=True)
