"""Precision choice, and float16 dynamic loss scaling on the CPU."""
import numpy as np
import pytest
import tensorflow as tf

from fastcore import precision, run


def test_explicit_choices_map_to_keras_policies():
    assert precision.resolve("float32", xla=True).policy == "float32"
    assert precision.resolve("bfloat16", xla=True).policy == "mixed_bfloat16"
    f16 = precision.resolve("float16", xla=True)
    assert f16.policy == "mixed_float16" and f16.loss_scaling


def test_auto_says_why():
    choice = precision.resolve("auto", xla=True)
    assert choice.name in ("float32", "bfloat16", "float16") and choice.reason.startswith("auto:")
    if "amx_bf16" in precision.cpu_flags() and not tf.config.list_physical_devices("GPU"):
        assert choice.name == "float32"                                   # XLA on CPU: no AMX
        assert precision.resolve("auto", xla=False).name == "bfloat16"   # oneDNN graph: AMX


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="float8"):
        precision.resolve("float8", xla=True)


@pytest.mark.parametrize("mode", ["xla", "eager"])
def test_float16_skips_a_non_finite_step_and_lowers_the_scale(data_dir, mode):
    p = run.plan(run.RunConfig("higgs", data_dir=data_dir, precision="float16", train_split="train[:1000]",
                               eval_split="train[1000:1500]"))
    step = run.build_step(p, p.precision, mode)
    x, y = next(iter(run.pipelines.train_stream(p.train, p.batch_size, 0)))
    step.train_one(x, y)   # builds everything, one good step
    before = [v.numpy().copy() for v in step.model.trainable_variables]
    scale = float(step.optimizer.dynamic_scale)
    poisoned = tf.tensor_scatter_nd_update(x, [[0, 0]], [np.float32(6e4)])   # overflows float16 activations
    loss = step.train_one(poisoned * 1e3, y)
    assert not np.isfinite(float(loss)) or float(step.optimizer.dynamic_scale) < scale
    after = [v.numpy() for v in step.model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "a non-finite step changed the weights"
    assert float(step.optimizer.dynamic_scale) == scale / 2
