"""A K-step call checked once (its steps unguarded, its losses and state checked at the end, the call run again
under the per-step guard when they are not finite) ends where the per-step guard ends: the same counters and
first non-finite step, the same variables and logs (bit for bit as a plain graph and eagerly; under XLA to
float32's rounding, as its fusions differ: a BatchNormalization moving mean was seen 1 ulp apart)."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from fastcore.engine import step as step_module
from fastcore.engine.step import Engine
from test_skipped_step import BATCH, batch, bn_mlp, mse_step

K = 4


class PerStepGuard(Engine):
    """The reference: every step of every call guarded."""

    def checks_per_call(self) -> bool:
        return False


def pair(mode="xla", optimizer=lambda: keras.optimizers.Adam(1e-2), step=mse_step, model=bn_mlp, unroll=(False, False)):
    """(the default engine, the per-step reference) on the same model, weights and optimizer; `unroll`: whether
    each unrolls its K steps (Engine._steps)."""
    out = []
    for cls, unroll_steps in zip((Engine, PerStepGuard), unroll):
        m = model()
        out.append(cls({"model": m}, {"optimizer": optimizer()}, step(m), global_batch_size=BATCH, mode=mode,
                       unroll_steps=unroll_steps))
    return out


def stacked(seeds, nan_at=None):
    batches = [batch(seed, nan=i == nan_at) for i, seed in enumerate(seeds)]
    return tf.nest.map_structure(lambda *t: tf.stack(t), *batches)


def state(engine) -> list[np.ndarray]:
    return [np.asarray(v.numpy()).copy() for v in engine.state_variables]


def assert_identical(a, b) -> None:
    """Bit for bit, except under XLA: there to a few ulps of float32 (integers and counters exactly)."""
    for u, v, variable in zip(state(a), state(b), a.state_variables):
        where = getattr(variable, "path", variable.name)
        if a.mode == "xla" and u.dtype.kind == "f":
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6, err_msg=where)
        else:
            np.testing.assert_array_equal(u, v, err_msg=where)


def same_logs(a: dict, b: dict, mode: str) -> bool:
    a, b = {n: float(v) for n, v in a.items()}, {n: float(v) for n, v in b.items()}
    return a.keys() == b.keys() and all(a[n] == b[n] if mode != "xla" else np.isclose(a[n], b[n], rtol=1e-5)
                                        for n in a)


@pytest.mark.parametrize("mode", ["xla", "graph", "eager"])
def test_clean_calls_end_bit_identical_to_the_per_step_guard(mode):
    checked, reference = pair(mode)
    assert checked.checks_per_call() and not reference.checks_per_call()
    for call in range(3):
        seeds = range(call * K, call * K + K)
        logs = checked.train_many(stacked(seeds)), reference.train_many(stacked(seeds))
        assert same_logs(*logs, mode)
    assert_identical(checked, reference)
    assert int(checked.steps.numpy()) == int(checked.applied.numpy()) == 3 * K
    assert int(checked.replayed_calls.numpy()) == 0


@pytest.mark.parametrize("mode", ["xla", "eager"])
@pytest.mark.parametrize("nan_at", [0, 2, K - 1])
def test_a_nan_mid_call_is_replayed_and_stops_where_the_per_step_guard_stops(mode, nan_at):
    checked, reference = pair(mode)
    for engine in (checked, reference):
        engine.train_many(stacked(range(K)))
        engine.train_many(stacked(range(K, 2 * K), nan_at=nan_at))
    assert int(checked.replayed_calls.numpy()) == 1
    assert int(checked.first_non_finite_step.numpy()) == K + nan_at + 1
    assert_identical(checked, reference)
    assert all(np.isfinite(v.numpy()).all() for v in checked.model_variables)
    if mode != "eager":   # the replay compiled when first needed
        assert checked.ledger.counts() == {"train": 1, "train replay": 1}
        assert reference.ledger.counts() == {"train": 1}


@pytest.mark.parametrize("mode", ["xla", "graph"])
def test_clean_calls_compile_one_loop_body_and_the_replay_only_when_needed(mode):
    """The first compile holds the unguarded K steps only: a run whose calls stay finite never traces the
    per-step-guarded replay (it doubled the first call's compile: HIGGS MLP under XLA 4.6-4.8 s against 1.8-2.0)."""
    checked, _ = pair(mode)
    for call in range(2):
        checked.train_many(stacked(range(call * K, call * K + K)))
    assert checked.ledger.counts() == {"train": 1}
    library = checked.train_many_function().get_concrete_function(stacked(range(K))).graph.as_graph_def().library
    bodies = [f.signature.name for f in library.function if "while_body" in f.signature.name]
    assert len(bodies) == 1, bodies   # the K-step loop once: no per-step-guarded copy beside it


def test_the_pre_flight_warm_up_with_updates_off_changes_nothing_and_compiles_no_replay():
    checked, _ = pair()
    before = state(checked)
    checked.updates_on.assign(False)
    checked.train_many(stacked(range(K)))
    checked.updates_on.assign(True)
    for u, v in zip(before, state(checked)):
        np.testing.assert_array_equal(u, v)
    assert checked.ledger.counts() == {"train": 1} and int(checked.replayed_calls.numpy()) == 0


def inf_gradient_step(model):
    """The mse step, but a batch whose first label is 1e9 gets an Inf gradient for the last kernel while its
    loss stays finite: only the optimizer's state and the weights can show it."""
    def step(data, ctx):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(ctx.call(model, x) - tf.minimum(y, 1.0)))
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        grads[-2] = tf.where(y[0, 0] > 1e8, tf.fill(tf.shape(grads[-2]), np.inf), grads[-2])
        return fastcore.Update(loss, zip(grads, variables))
    return step


@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.SGD(0.1), lambda: keras.optimizers.Adam(1e-2),
                                       lambda: keras.optimizers.Lion(1e-3)], ids=["sgd", "adam", "lion"])
def test_an_inf_gradient_with_a_finite_loss_is_caught_at_the_call_end(optimizer):
    checked, reference = pair(optimizer=optimizer, step=inf_gradient_step)
    x, y = stacked(range(K))
    y = tf.tensor_scatter_nd_update(y, [[2, 0, 0]], [1e9])   # step 3 of the call
    for engine in (checked, reference):
        engine.train_many((x, y))
    assert int(checked.replayed_calls.numpy()) == 1
    assert int(checked.first_non_finite_step.numpy()) == int(reference.first_non_finite_step.numpy()) == 3
    assert_identical(checked, reference)


def test_what_could_hide_an_inf_or_cost_a_copy_keeps_the_per_step_guard(monkeypatch):
    def constrained():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, kernel_constraint=keras.constraints.NonNeg())])
    assert not pair(optimizer=lambda: keras.optimizers.SGD(0.1, clipvalue=1.0))[0].checks_per_call()
    assert not pair(model=constrained)[0].checks_per_call()
    m = bn_mlp()
    scaled = Engine({"model": m}, {"optimizer": keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))},
                    mse_step(m), global_batch_size=BATCH, loss_scaling=True)
    assert not scaled.checks_per_call()
    engine = pair()[0]
    assert engine.checks_per_call()
    monkeypatch.setattr(step_module, "CALL_CHECK_BYTES", 64)   # a state too large to copy
    assert not engine.checks_per_call()


class HoldsInf(keras.layers.Layer):
    """A layer with a non-trainable variable that is Inf on purpose (a running minimum's start)."""

    def build(self, shape):
        self.lowest = self.add_weight(shape=(), initializer=keras.initializers.Constant(np.inf), trainable=False)

    def call(self, x):
        return x


def test_a_state_non_finite_on_purpose_trains_under_the_per_step_guard_without_replays():
    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8,)), HoldsInf(), keras.layers.Dense(1)])
    checked, reference = pair(model=model)
    for engine in (checked, reference):
        engine.train_many(stacked(range(K)))
    assert int(checked.replayed_calls.numpy()) == 0
    assert int(checked.applied.numpy()) == K and int(checked.first_non_finite_step.numpy()) == -1
    assert_identical(checked, reference)


def loop_ops(engine, batches) -> set[str]:
    graph = engine.train_many_function().get_concrete_function(batches).graph
    return {op.type for op in graph.get_operations() if "While" in op.type}


@pytest.mark.parametrize("mode", ["xla", "graph"])
def test_unrolled_steps_end_where_the_loop_ends_and_hold_no_loop(mode):
    """A convnet on a CPU unrolls XLA's K steps (fastcore.engine.pathchoice): the same steps, checks and
    replays as the while loop, traced one after another at the call's top level."""
    unrolled, looped = pair(mode, unroll=(True, False))
    for engine in (unrolled, looped):
        engine.train_many(stacked(range(K)))
        engine.train_many(stacked(range(K, 2 * K), nan_at=2))   # put back, replayed under the per-step guard
    assert_identical(unrolled, looped)
    assert int(unrolled.first_non_finite_step.numpy()) == K + 3 and int(unrolled.replayed_calls.numpy()) == 1   # counted from 1
    assert loop_ops(unrolled, stacked(range(K))) == set() and loop_ops(looped, stacked(range(K)))
