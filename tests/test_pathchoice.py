"""mode="auto": the compiled path is timed on the run's own step, the fastest kept, said and recorded."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from fastcore.engine import pathchoice
from fastcore.engine.precision import Precision
from fastcore.observe import calibrate

rng = np.random.default_rng(0)
X = rng.normal(size=(512, 8)).astype("float32")
Y = (X.sum(axis=1, keepdims=True) > 0).astype("float32")


def mlp():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])


def bce():
    return keras.losses.BinaryCrossentropy(from_logits=True)


def test_auto_times_every_candidate_keeps_the_fastest_and_records_why(tmp_path):
    trainer = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-3), loss=bce())
    result = trainer.fit(X, Y, batch_size=32, epochs=1, run_dir=str(tmp_path), verbose=False)
    rates = trainer.path.rates
    assert set(rates) == {"xla/1", "graph/1", "xla/K", "graph/K"}
    assert all(v > 0 for v in rates.values())
    chosen = f"{trainer.path.mode}/{'1' if trainer.path.steps_per_call == 1 else 'K'}"
    assert rates[chosen] * pathchoice.TIE >= max(rates.values())
    assert trainer.path.reason.startswith(f"auto: {trainer.path.mode}, {trainer.path.steps_per_call} step(s) per call; ")
    assert trainer.run_mode == trainer.path.mode == result.summary["mode"]
    assert result.summary["steps_per_call"] == trainer.path.steps_per_call
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["mode_reason"].startswith("auto: ") and "ex/s" in on_disk["mode_reason"]


def test_a_second_trainer_on_the_same_model_reuses_the_cached_timing(quiet_timing):
    first = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-3), loss=bce())
    first.feed(X, Y, batch_size=64)
    again = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-3), loss=bce())
    again.feed(X, Y, batch_size=64)
    assert "(timed now in " in first._paths[64].reason
    assert again._paths[64].reason.endswith("(cached)")
    assert again._paths[64].rates == first._paths[64].rates


@pytest.mark.parametrize("cached", [{"xla/1": 0, "graph/1": 5.0}, {"xla/1": float("nan"), "graph/1": 1.0},
                                    {"xla/1": 1.0}, "junk"])
def test_an_implausible_cached_timing_is_measured_again(cached, quiet_timing):
    trainer = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss=bce())
    feed = trainer.feed(X, Y, batch_size=512)   # one step per epoch: K = 1, two candidates
    key = next(k for k in calibrate._load()[calibrate.machine_key()] if k.startswith("path/") and "/b512/" in k)
    calibrate.store(key, cached)
    again = fastcore.Trainer(mlp, keras.optimizers.SGD(0.01), loss=bce())
    again.feed(X, Y, batch_size=512)
    assert "timed now" in again._paths[512].reason
    assert set(again._paths[512].rates) == {"xla/1", "graph/1"} and feed.batch_size == 512


def test_timing_leaves_a_built_model_and_a_step_closure_state_as_they_were():
    model = mlp()
    before = [v.numpy().copy() for v in model.variables]
    seeds = keras.random.SeedGenerator(7)
    seed_before = seeds.state.numpy().copy()

    def step(batch, ctx):
        x, y = batch
        noise = keras.random.normal(tf.shape(x), seed=seeds) * 0.01
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(bce()(y, ctx.call(ctx.model, x + noise)))
        return fastcore.Update(loss, zip(tape.gradient(loss, ctx.model.trainable_variables), ctx.model.trainable_variables))

    trainer = fastcore.Trainer(model, keras.optimizers.Adam(1e-2), step=step)
    trainer.feed(tf.data.Dataset.from_tensor_slices((X, Y)).batch(32, drop_remainder=True))
    assert "timed now" in trainer._paths[32].reason
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))
    assert np.array_equal(seed_before, seeds.state.numpy())


def test_requested_modes_are_exact_and_not_timed():
    for mode in ("xla", "graph"):
        trainer = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-3), loss=bce(), mode=mode)
        result = trainer.fit(X, Y, batch_size=32, epochs=1, verbose=False)
        assert trainer.run_mode == mode and result.summary["mode_reason"] == "requested"
        assert trainer.path.rates == {}


def test_preflight_and_verify_check_the_path_auto_chose():
    trainer = fastcore.Trainer(mlp, keras.optimizers.Adam(1e-3), loss=bce())
    trainer.fit(X, Y, batch_size=32, epochs=1, verbose=False)
    assert trainer.engine.mode == trainer.run_mode
    assert trainer.preflight_report is not None
    report = trainer.verify(X, Y, batch_size=32, steps=4)
    assert report.passed, report.verdict


def test_choose_prefers_the_first_listed_path_on_a_near_tie(monkeypatch):
    rates = {"xla/1": 100.0, "graph/1": 101.0, "xla/K": 100.5, "graph/K": 50.0}
    monkeypatch.setattr(calibrate, "cached", lambda name: rates)
    path = pathchoice.choose(None, Precision("float32", "timing"), None, 32, 8, "key")
    assert (path.mode, path.steps_per_call) == ("xla", 8)
    rates["graph/1"] = 200.0
    path = pathchoice.choose(None, Precision("float32", "timing"), None, 32, 8, "key")
    assert (path.mode, path.steps_per_call) == ("graph", 1)


def conv():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                             keras.layers.Dense(1)])


CONV_X, CONV_Y = rng.normal(size=(512, 8, 8, 1)).astype("float32"), rng.normal(size=(512, 1)).astype("float32")


def test_a_convnet_on_a_cpu_is_timed_with_xla_steps_unrolled_and_says_so(monkeypatch):
    monkeypatch.setattr(pathchoice, "UNROLL_WORTH", float("inf"))   # XLA's one step never too slow to try
    trainer = fastcore.Trainer(conv, keras.optimizers.SGD(0.01), loss="mse")
    result = trainer.fit(CONV_X, CONV_Y, batch_size=16, epochs=1, verbose=False)   # 32 steps per epoch
    assert set(trainer.path.rates) == {"xla/1", "graph/1", "xla/K", "graph/K"}
    reason = result.summary["mode_reason"]
    assert f"xla/{pathchoice.UNROLLED_MOST} " in reason and "graph/32 " in reason   # XLA unrolls 8 of the 32
    assert "XLA's steps unrolled (a convnet on a CPU" in reason
    assert trainer.engine.unroll_steps == (trainer.run_mode == "xla")


def test_unrolled_xla_is_not_compiled_when_its_one_step_is_far_behind_a_graphs(monkeypatch, tmp_path, quiet_timing):
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path))   # timed here, not read from another test's cache
    one_step = iter([0.3, 0.1])   # xla/1, then graph/1: XLA's step 3x a graph's

    def scripted(call):
        call()   # it compiles, as the real one does
        return next(one_step)
    monkeypatch.setattr(pathchoice, "_compiled_then_timed", scripted)
    trainer = fastcore.Trainer(conv, keras.optimizers.SGD(0.01), loss="mse")
    feed = trainer.feed(CONV_X, CONV_Y, batch_size=16)
    path = trainer._paths[16]
    assert set(path.rates) == {"xla/1", "graph/1", "graph/K"}
    assert "; XLA's steps not timed unrolled (a convnet on a CPU): XLA's one step ran " in path.reason
    assert feed.batch_size == 16
    again = fastcore.Trainer(conv, keras.optimizers.SGD(0.01), loss="mse")   # the timing without it is cached
    again.feed(CONV_X, CONV_Y, batch_size=16)
    assert again._paths[16].reason.endswith("x a graph's") and "(cached)" in again._paths[16].reason


def test_a_convnet_under_requested_xla_unrolls_the_steps_it_is_asked_for():
    trainer = fastcore.Trainer(conv, keras.optimizers.SGD(0.01), loss="mse", mode="xla", steps_per_call=4)
    feed = trainer.feed(CONV_X, CONV_Y, batch_size=16)
    engine = trainer.build(feed)
    assert engine.unroll_steps and trainer.path.steps_per_call == 4
    calls = next(iter(feed.dataset))
    engine.train_many(calls)
    assert int(engine.steps.numpy()) == 4
    graph = engine.train_many_function().get_concrete_function(calls).graph
    assert not [op for op in graph.get_operations() if "While" in op.type]
