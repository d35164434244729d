"""Varying shapes, bounded: text padded per batch trains, compiles once per shape up to `max_shapes`, says
how many, and is refused in one line beyond the cap."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from fastcore.engine import feeding, inference
from fastcore.engine.step import Engine, TraceLedger, Update

LENGTHS = (5, 9, 14)   # each batch's longest sequence, in turn: padded_batch gives 3 shapes
BATCH = 32


def sequences(lengths=LENGTHS, batches=12, short_tail=0):
    """Token sequences whose batch i (of BATCH) has its longest at lengths[i % len(lengths)]; labels [1]."""
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(batches):
        top = lengths[i % len(lengths)]
        seqs += [rng.integers(1, 50, size=top if j == 0 else int(rng.integers(1, top + 1))) for j in range(BATCH)]
    seqs += [rng.integers(1, 50, size=3) for _ in range(short_tail)]
    return [s.astype("int32") for s in seqs], [np.array([float(s[0] > 25)], "float32") for s in seqs]


def text_data(lengths=LENGTHS, batches=12, short_tail=0, drop_remainder=True):
    seqs, labels = sequences(lengths, batches, short_tail)
    ds = tf.data.Dataset.from_generator(lambda: zip(seqs, labels), output_signature=(
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([1], tf.float32)))
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(seqs)))
    return ds.padded_batch(BATCH, drop_remainder=drop_remainder)   # each batch padded to its own longest


def text_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(50, 8, mask_zero=True),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])


LOSS = keras.losses.BinaryCrossentropy(from_logits=True)


def test_padded_batch_text_trains_with_one_compile_per_shape():
    ds = text_data()
    trainer = fastcore.Trainer(text_model(), keras.optimizers.Adam(1e-2), loss=LOSS, steps_per_call=4)
    result = trainer.fit(ds, epochs=1, validation_data=ds, verbose=False)
    assert np.isfinite(result.history[-1]["train_loss"]) and np.isfinite(result.history[-1]["eval_loss"])
    assert result.summary["traces"] == {"train": 3, "eval": 3}   # 3 calls of 4 steps, 3 shapes: 3 compiles each
    assert trainer.engine.ledger.shapes() == {"train": 3, "eval": 3}


def test_one_step_per_call_compiles_once_per_shape_too():
    trainer = fastcore.Trainer(text_model(), keras.optimizers.Adam(1e-2), loss=LOSS, steps_per_call=1,
                               mode="graph", preflight=False)   # the same traces as XLA, without its compiles
    result = trainer.fit(text_data(), epochs=1, verbose=False)
    assert result.summary["traces"] == {"train": 3}   # 12 calls


def test_evaluation_of_varying_shapes_counts_every_example_once_as_keras_does():
    ds = text_data(short_tail=7, drop_remainder=False)   # 12 full batches and a last one of 7
    net = text_model()
    trainer = fastcore.Trainer(net, keras.optimizers.Adam(1e-2), loss=LOSS)
    engine = trainer.build(trainer.feed(ds, steps_per_epoch=12))
    net.compile(loss=LOSS)
    ours, theirs = inference.evaluate(engine, ds), net.evaluate(ds, return_dict=True, verbose=0)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert engine.ledger.shapes()["eval"] == 4   # the short last batch is padded to 32 rows: length 3 is a 4th shape


def test_the_steps_of_one_call_share_a_shape_and_no_batch_is_lost():
    ds = text_data()
    stacked = list(feeding.stacked_calls(ds, 4, varying=True))
    assert [tuple(x.shape) for x, _ in stacked] == [(4, BATCH, 5), (4, BATCH, 9), (4, BATCH, 14)]
    given = sorted(np.asarray(x).tobytes() for x, _ in ds)
    walked = sorted(np.asarray(x[k]).tobytes() for x, _ in stacked for k in range(4))
    assert walked == given


def test_the_default_steps_per_call_stays_small_when_shapes_vary():
    assert feeding.steps_per_call(BATCH, 48) == 48   # fixed shapes: about 8k examples per call
    assert feeding.steps_per_call(BATCH, 48, varying=True) == 8   # each shape buffers up to K-1 batches
    assert feeding.steps_per_call(BATCH, 48, requested=16, varying=True) == 16


def test_more_shapes_than_the_cap_is_one_line_naming_the_cap_and_the_fix():
    ds = text_data(lengths=tuple(range(3, 13)), batches=10)   # 10 shapes, default cap 8
    trainer = fastcore.Trainer(text_model(), keras.optimizers.Adam(1e-2), loss=LOSS, steps_per_call=1,
                               mode="graph", preflight=False)   # the same traces as XLA, without its compiles
    with pytest.raises(fastcore.UsageError, match=r"compile for shape 9 .*beyond max_shapes=8: pad the data") as e:
        trainer.fit(ds, epochs=1, verbose=False)
    assert "\n" not in str(e.value) and "bucket_by_sequence_length" in str(e.value)
    assert trainer.engine.ledger.shapes()["train"] == 8   # the 9th shape never compiled


def test_max_shapes_is_the_trainers_option():
    trainer = fastcore.Trainer(text_model(), keras.optimizers.Adam(1e-2), loss=LOSS, steps_per_call=1, max_shapes=2,
                               mode="graph", preflight=False)
    with pytest.raises(fastcore.UsageError, match="beyond max_shapes=2"):
        trainer.fit(text_data(), epochs=1, verbose=False)


def test_a_shape_is_a_compile_not_a_retrace_when_the_data_varies():
    scale = tf.Module()
    scale.w = tf.Variable(1.0)

    def step(batch, ctx):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(batch) * scale.w
        return Update(loss, [(tape.gradient(loss, scale.w), scale.w)])
    engine = Engine({"m": scale}, {"m": keras.optimizers.SGD(0.1)}, step, global_batch_size=2, max_shapes=2)
    engine.ledger.varying_shapes = True
    for width in (3, 5, 3):
        engine.train_one(tf.ones([2, width]))
    assert engine.ledger.counts() == {"train": 2} and engine.ledger.retraces() == []
    with pytest.raises(fastcore.UsageError, match="beyond max_shapes=2"):
        engine.train_one(tf.ones([2, 7]))


def test_max_shapes_must_be_positive():
    with pytest.raises(fastcore.UsageError, match="max_shapes=0 must be a positive integer"):
        TraceLedger(max_shapes=0)
