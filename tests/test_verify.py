"""Compiled vs eager equivalence on real data, for every task, in every precision."""
import pytest

import tensorflow as tf

from fastcore.cli import plan as run
from fastcore.engine import verify
from helpers import train

SMALL = {   # enough data for 20 steps, kept small so the suite stays fast
    "line": {}, "sine": {},
    "mnist": {"train_split": "test[:1000]", "eval_split": "test[1000:1200]"},
    "fashion_mnist": {"train_split": "train[:1000]", "eval_split": "test[:200]"},
    "higgs": {"train_split": "train[:10000]", "eval_split": "train[10000:]", "l2": 1e-3, "dropout": 0.2},
}


@pytest.mark.parametrize("api", ["keras-functional", "module"])
@pytest.mark.parametrize("task", list(SMALL))
def test_verify_20_passes_in_float32(data_dir, task, api):
    summary, _ = train(task, data_dir, model_api=api, precision="float32", verify=20, epochs=1, **SMALL[task])
    report = summary["verify"]
    assert report["passed"], report["verdict"]
    assert report["steps"] >= 20
    assert max(d["max_rel"] for d in report["compiled_vs_eager"]) <= verify.FLOAT32_RTOL


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("api", ["keras-sequential", "module"])
def test_low_precision_is_judged_against_a_float32_reference(data_dir, precision, api):
    summary, _ = train("higgs", data_dir, model_api=api, precision=precision, verify=20, epochs=1, **SMALL["higgs"])
    report = summary["verify"]
    assert report["precision"] == precision
    assert report["passed"], report["verdict"]
    assert "float32 reference" in report["verdict"]
    # low precision really is low: the compiled run is measurably away from float32
    assert max(d["max_rel"] for d in report["compiled_vs_reference"]) > 1e-4


def test_verify_catches_a_compiled_step_that_differs(data_dir):
    p = run.plan(run.RunConfig("higgs", data_dir=data_dir, precision="float32", preflight=False, **SMALL["higgs"]))
    engine = p.trainer.engine
    honest = engine.step_fn

    def subtly_different_when_compiled(batch, ctx):   # 1% larger gradients, only inside tf.function
        update = honest(batch, ctx)
        if tf.executing_eagerly():
            return update
        return update.__class__(update.loss, [(g * 1.01, v) for g, v in update.gradients])
    engine.step_fn = subtly_different_when_compiled
    report = p.trainer.verify(p.feed, steps=20)
    assert not report.passed
    assert "FAIL" in report.lines()[0]
