"""A NaN in the data: float32 stops at the right step with good weights; float16 skips and counts."""
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

import pipelines
from fastcore import NonFiniteError
from fastcore.cli import plan as run, session

BAD_STEP = 6   # after checkpoints at steps 2 and 4


def poisoned_plan(data_dir, tmp_path, precision, **flags):
    """The HIGGS plan with a NaN in the first example of step BAD_STEP's batch."""
    p = run.plan(run.RunConfig("higgs", data_dir=data_dir, train_split="train[:4000]", eval_split="train[4000:5000]",
                               precision=precision, logdir=str(tmp_path), epochs=3, steps_per_call=2,
                               checkpoint_every=2, **flags))
    batches = pipelines.train_stream(p.train, p.batch_size, p.config.seed, 1)
    example = next(iter(batches.skip(BAD_STEP - 1)))[0][0].numpy()
    row = int(np.flatnonzero((p.train.x == example).all(axis=1))[0])
    x = p.train.x.copy()
    x[row, 3] = np.nan
    train = dataclasses.replace(p.train, x=x)
    return dataclasses.replace(p, train=train, feed=p.trainer.feed(train, batch_size=p.batch_size))


def first_step_with_nan(p) -> int:
    """1-based step whose batch holds the poisoned row, from the same stream the loop reads."""
    for call, (xs, _) in enumerate(pipelines.train_stream(p.train, p.batch_size, p.config.seed, 2)):
        for k in range(2):
            if np.isnan(xs[k].numpy()).any():
                return call * 2 + k + 1


def test_float32_stops_at_the_bad_step_and_keeps_good_weights(data_dir, tmp_path):
    p = poisoned_plan(data_dir, tmp_path, "float32")
    bad = first_step_with_nan(p)
    assert bad == BAD_STEP
    with pytest.raises(NonFiniteError) as stopped:
        session.train_and_summarize(p)
    summary, step = stopped.value.summary, p.trainer.engine
    assert summary["non_finite"]["step"] == bad
    assert summary["guard"] == {"checked": "per call", "replayed_calls": 1}   # K=2: found by the call's check
    assert all(np.isfinite(v.numpy()).all() for v in step.model.trainable_variables)
    assert int(step.optimizer.iterations.numpy()) == bad - 1   # every step before it applied, none after
    last = summary["non_finite"]["last_good_checkpoint"]
    saved_steps = sorted(int(f.split("-")[1].split(".")[0]) for f in os.listdir(p.checkpoint_dir) if f.endswith(".index"))
    assert saved_steps and max(saved_steps) < bad and last.endswith(f"-{max(saved_steps)}")
    reader = tf.train.load_checkpoint(last)
    assert all(np.isfinite(reader.get_tensor(n)).all() for n, _ in tf.train.list_variables(last) if n.startswith("models/"))


def test_float16_skips_the_bad_step_counts_it_and_goes_on(data_dir, tmp_path):
    p = poisoned_plan(data_dir, tmp_path, "float16")
    summary, step = session.train_and_summarize(p)
    assert "non_finite" not in summary
    assert summary["steps"] == 24
    # the poisoned row comes back once per epoch; each time that step is skipped
    assert summary["skipped_steps"] >= 3
    assert all(np.isfinite(v.numpy()).all() for v in step.model.trainable_variables)


def test_the_cli_says_it_in_one_line_with_exit_code_3(data_dir, tmp_path, capsys, monkeypatch):
    p = poisoned_plan(data_dir, tmp_path, "float32")
    monkeypatch.setattr(session.planning, "plan", lambda config, strategy=None, data=None: p)
    args = session.argparse.Namespace(task="higgs", resume=False)
    assert session.main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"at step {first_step_with_nan(p)}" in err[0] and "last good checkpoint" in err[0]
