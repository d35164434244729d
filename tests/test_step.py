"""The step: one trace per run, K stacked steps equal K single steps, regularization and modes."""
import numpy as np
import pytest
import tensorflow as tf

import pipelines
from fastcore.cli import plan as run
from helpers import train


def plan(data_dir, **flags):
    return run.plan(run.RunConfig("higgs", data_dir=data_dir, train_split="train[:2000]",
                                  eval_split="train[2000:2600]", precision="float32", **flags))


@pytest.mark.parametrize("mode", ["xla", "graph"])
def test_a_full_run_traces_each_compiled_function_once(data_dir, mode):
    summary, step = train("higgs", data_dir, mode=mode, epochs=3, train_split="train[:2000]",
                          eval_split="train[2000:2600]", steps_per_call=2)
    assert summary["steps"] == 12
    assert step.ledger.counts() == {"train": 1, "eval": 1}


def test_k_steps_in_one_call_equal_k_single_calls(data_dir):
    stacked = plan(data_dir, steps_per_call=4, l2=1e-3, dropout=0.2).trainer.engine
    single = plan(data_dir, steps_per_call=4, l2=1e-3, dropout=0.2).trainer.engine
    xs, ys = next(iter(pipelines.train_stream(plan(data_dir).train, 500, 0, 4)))
    mean_loss = stacked.train_many((xs, ys))["loss"]
    losses = [single.train_one((xs[i], ys[i]))["loss"] for i in range(4)]
    assert float(mean_loss) == pytest.approx(float(np.mean(losses)), rel=1e-5)
    for a, b in zip(stacked.model.trainable_variables, single.model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_regularization_is_part_of_the_training_loss(data_dir):
    plain = plan(data_dir, mode="eager").trainer.engine
    regularized = plan(data_dir, l2=1e-2, mode="eager").trainer.engine
    x, y = next(iter(pipelines.train_stream(plan(data_dir).train, 500, 0)))
    penalty = float(tf.add_n(regularized.model.losses))
    assert penalty > 0
    assert float(regularized.train_one((x, y))["loss"]) == pytest.approx(
        float(plain.train_one((x, y))["loss"]) + penalty, rel=1e-5)


def test_evaluation_counts_every_example_once(data_dir):
    summary, step = train("higgs", data_dir, epochs=1, train_split="train[:1000]", eval_split="train[1000:1777]")
    held_out = pipelines.load("higgs", "train[1000:1777]", data_dir)
    x, y = held_out.x, held_out.y
    logits = step.model(x, training=False).numpy()
    expected = np.mean((logits > 0).astype(np.float32) == y)
    assert summary["eval"]["binary_accuracy"] == pytest.approx(expected, abs=1e-6)
