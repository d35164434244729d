"""Precision choice, and float16 dynamic loss scaling on the CPU."""
import dataclasses
import io

import numpy as np
import pytest
import tensorflow as tf

import pipelines
from fastcore.cli import plan as run, session
from fastcore.engine import precision
from fastcore.observe import calibrate, timing


def test_explicit_choices_map_to_keras_policies():
    assert precision.resolve("float32", xla=True).policy == "float32"
    assert precision.resolve("bfloat16", xla=True).policy == "mixed_bfloat16"
    f16 = precision.resolve("float16", xla=True)
    assert f16.policy == "mixed_float16" and f16.loss_scaling


@pytest.mark.parametrize("xla", [True, False])
def test_auto_follows_the_measured_peaks_and_says_why(xla, quiet_timing):   # quiet: the peaks are cached
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU machine takes float16 without measuring")   # the CPU path is what CI runs
    path = "xla" if xla else "graph"
    bf16_paths = ("xla", "graph") if xla else ("graph",)   # under XLA the plain graph's bfloat16 is a candidate too
    peaks = calibrate.peaks([("float32", path)] + [("bfloat16", p) for p in bf16_paths])
    f32 = peaks[f"float32/{path}"][0]
    bf16 = [peaks[f"bfloat16/{p}"][0] for p in bf16_paths]
    choice = precision.resolve("auto", xla=xla, graph_bf16=xla)
    assert choice.name == ("bfloat16" if max(bf16) >= precision.BF16_GAIN * f32 else "float32")
    assert choice.reason.startswith("auto:") and f"{f32:.0f}" in choice.reason
    assert all(f"{rate:.0f}" in choice.reason for rate in bf16)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="float8"):
        precision.resolve("float8", xla=True)


@pytest.mark.parametrize("mode", ["xla", "eager"])
def test_float16_skips_a_non_finite_step_and_lowers_the_scale(data_dir, mode):
    p = run.plan(run.RunConfig("higgs", data_dir=data_dir, precision="float16", mode=mode, train_split="train[:1000]",
                               eval_split="train[1000:1500]"))
    step = p.trainer.build(p.feed)
    x, y = next(iter(pipelines.train_stream(p.train, p.batch_size, 0)))
    step.train_one((x, y))   # builds everything, one good step
    before = [v.numpy().copy() for v in step.model.trainable_variables]
    scale = float(step.optimizer.dynamic_scale)
    poisoned = tf.tensor_scatter_nd_update(x, [[0, 0]], [np.float32(6e4)])   # overflows float16 activations
    loss = step.train_one((poisoned * 1e3, y))["loss"]
    assert not np.isfinite(float(loss)) or float(step.optimizer.dynamic_scale) < scale
    after = [v.numpy() for v in step.model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "a non-finite step changed the weights"
    assert float(step.optimizer.dynamic_scale) == scale / 2


def test_auto_lets_the_tasks_own_step_decide(data_dir, monkeypatch, tmp_path, quiet_timing):
    """When the matmul peaks propose bfloat16, the faster of the two timed steps wins."""
    from fastcore.engine import autoprecision
    monkeypatch.setattr(autoprecision, "resolve", lambda name, xla, graph_bf16: precision.Precision("bfloat16", "auto: peaks say so"))
    config = run.RunConfig("mnist", data_dir=data_dir, train_split="test[:640]", eval_split="test[640:700]",
                           steps_per_call=4)
    def step_keys():   # other runs of the session (e.g. --threads auto's timing children) cache theirs too
        return {k for k in calibrate._load().get(calibrate.machine_key(), {}) if k.startswith("step/")}
    before = step_keys()
    timed = run.plan(config)    # measures both steps for real and caches the rates
    keys = sorted(step_keys() - before)
    assert len(keys) == 1 and "/b32/k4/xla" in keys[0]
    key = keys[0]
    rates = calibrate.cached(key)
    graph = autoprecision.GRAPH_BF16   # under XLA, bfloat16 is also timed as a plain graph
    assert set(rates) == {"float32", "bfloat16", graph} and all(r > 0 for r in rates.values())
    bf16 = max(rates["bfloat16"], rates[graph])
    assert timed.precision.name == ("bfloat16" if bf16 >= autoprecision.MARGIN * rates["float32"] else "float32")
    assert timed.precision.reason.startswith(f"auto: {timed.precision.name}") and "timed now in " in timed.precision.reason
    cases = {(1.0, 2.0, 1.0): ("bfloat16", "xla"), (1.0, 2.0, 2.2): ("bfloat16", "graph"),
             (1.0, 2.0, 2.05): ("bfloat16", "xla"), (2.0, 1.0, 1.5): ("float32", "xla"),
             (1.0, 0.5, 2.0): ("bfloat16", "graph")}
    for (f32, xla_bf16, graph_bf16), (name, mode) in cases.items():
        calibrate.store(key, {"float32": f32, "bfloat16": xla_bf16, graph: graph_bf16})
        p = run.plan(config)
        assert (p.precision.name, p.trainer.run_mode, p.trainer.engine.mode) == (name, mode, mode), (f32, xla_bf16, graph_bf16)
    calibrate.store(key, {"float32": 1.0, "bfloat16": 2.0, graph: 2.2})   # a resumed run keeps auto's path
    # planted rates, far below what the run measures: its recheck would drop them (tests/test_auto_decisions.py)
    monkeypatch.setattr(timing, "AGREE", (0.0, float("inf")))
    trained = dataclasses.replace(config, logdir=str(tmp_path), run_name="r", epochs=1)
    session.train_and_summarize(run.plan(trained), out=io.StringIO())
    resumed = run.plan(dataclasses.replace(trained, epochs=2, resume=True))
    assert (resumed.precision.name, resumed.trainer.run_mode) == ("bfloat16", "graph")
    assert "as trained in the checkpoint" in resumed.precision.reason
    calibrate.store(key, {"float32": 1.0, "bfloat16": 2.0})   # a cache from before the graph candidate: re-measured
    run.plan(config)
    assert set(calibrate.cached(key)) == {"float32", "bfloat16", graph}
