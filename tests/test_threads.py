"""--threads: auto times the run's own step on one thread and on all (child processes, cached) and keeps the
faster; all / N are taken as given; a bad value is one line."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from fastcore.train import run_cli

SMALL = ["--dataset", "mnist", "--train-split", "test[:2000]", "--eval-split", "test[8000:]", "--precision", "float32",
         "--epochs", "1"]


def run(data_dir, tmp_path, *args):
    done = subprocess.run([sys.executable, "-m", "fastcore.train", *SMALL, "--data-dir", data_dir, "--logdir",
                           str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = list(tmp_path.glob("*/summary.json"))
    line = next(line for line in done.stdout.splitlines() if line.startswith("threads: "))
    return line, json.loads(path.read_text())


def test_auto_times_the_step_both_ways_and_applies_the_faster(data_dir, tmp_path):
    line, summary = run(data_dir, tmp_path / "a")
    one, every = (float(part.split()[0].replace(",", "")) for part in line.split("auto: ")[1].split(", ")[:2])
    chosen = 1 if one > every * 1.05 else None
    assert line.startswith(f"threads: {chosen or 'all'} intra-op (auto: ") and "the step timed now" in line, line
    assert summary["intra_op_threads"] == (1 if chosen else len(os.sched_getaffinity(0)))
    again, _ = run(data_dir, tmp_path / "b")   # the same configuration: the answer is cached, unless noisy
    if "noisy, not cached" in line:
        assert "the step timed now" in again, again
    else:
        assert "the step timed earlier (cached)" in again and again.split(" (")[0] == line.split(" (")[0]


def test_a_given_count_is_used(data_dir, tmp_path):
    line, summary = run(data_dir, tmp_path, "--threads", "1")
    assert line == "threads: 1 intra-op (--threads 1)" and summary["intra_op_threads"] == 1


@pytest.mark.parametrize("value", ["0", "many", "-2"])
def test_a_bad_thread_count_is_one_line(value):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli(["--dataset", "mnist", "--threads", value])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--threads" in lines[0] and "auto, all or a positive number" in lines[0]


def test_auto_in_a_process_where_tensorflow_already_runs_keeps_its_setting(data_dir, tmp_path):
    import tensorflow as tf
    tf.constant(1.0) + 1.0   # the runtime exists now
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = run_cli([*SMALL, "--data-dir", data_dir, "--logdir", str(tmp_path)])
    assert code == 0
    assert "threads: all intra-op (all cores (TensorFlow had already started in this process))" in out.getvalue()
