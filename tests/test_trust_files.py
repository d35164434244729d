"""Shared files, caches and every CLI exit path: no planted link is followed, a run stays inside --logdir,
a cached figure is checked before use (no absurd figure printed), summary.json is strict JSON, and a
signal anywhere ends the command with one line and 130 / 143."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from helpers import cli, one_line
from fastcore import atomic
from fastcore.cli import plan as planning, threads
from fastcore.cli.args import parser
from fastcore.cli.session import config_from_args
from fastcore.engine import runguard
from fastcore.errors import UsageError
from fastcore.observe import calibrate, tensorboard

LINE = ["--dataset", "line", "--precision", "float32"]
MNIST = ["--dataset", "mnist", "--train-split", "test[:256]", "--eval-split", "test[256:512]", "--precision", "float32"]




def strict(path):
    """JSON as a strict reader takes it: a bare NaN / Infinity fails."""
    def refuse(name):
        raise ValueError(f"bare {name} in {path}")
    return json.loads(open(path).read(), parse_constant=refuse)


def start(*argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "fastcore.train", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for_line(proc, text, timeout=180):
    """Read stdout until a line holding `text` (the process is then past that point)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.communicate()
        if text in line:
            return line
    raise AssertionError(f"no {text!r} line within {timeout} s")


# --- planted links -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lock", ["run", "checkpoint"])
def test_a_planted_link_at_a_run_lock_is_refused_and_its_target_untouched(tmp_path, lock):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "logs" / "r" if lock == "run" else tmp_path / "ckpts"
    folder.mkdir(parents=True)
    os.symlink(victim, folder / ".lock")
    code, _, err = cli(*LINE, "--epochs", "1", "--logdir", str(tmp_path / "logs"), "--run-name", "r",
                       *(["--checkpoint-dir", str(folder)] if lock == "checkpoint" else []))
    assert code == 2
    one_line(err, ".lock", "symbolic link")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "logs" / "r" / "summary.json").exists()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(folder))
    return folder


def test_a_planted_link_at_the_calibration_lock_is_refused_and_nothing_created(tmp_path, cache):
    target = tmp_path / "created-through-the-link"
    os.symlink(target, cache / "calibration.json.lock")
    with pytest.raises(UsageError, match="calibration cache's lock file .* symbolic link"):
        calibrate.store("threads/x", {"one": 1e-5, "all": 1e-5})
    assert not target.exists() and not (cache / "calibration.json").exists()


def test_a_planted_link_at_the_calibration_cache_is_refused_and_its_target_untouched(tmp_path, cache):
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({calibrate.machine_key(): {"threads/x": {"one": 1.0, "all": 1.0}}}))
    before = victim.read_text()
    os.symlink(victim, cache / "calibration.json")
    with pytest.raises(UsageError, match="calibration cache .* symbolic link"):
        calibrate.cached("threads/x")
    with pytest.raises(UsageError, match="symbolic link"):
        calibrate.store("threads/x", {"one": 2.0, "all": 2.0})
    assert victim.read_text() == before and os.path.islink(cache / "calibration.json")


def test_an_atomic_write_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / "summary.json")
    atomic.write_json(str(tmp_path / "summary.json"), {"steps": 3})
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(tmp_path / "summary.json") and strict(tmp_path / "summary.json") == {"steps": 3}
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "victim.txt"]   # no temp file left


# --- run names and seeds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "ABS", "a/b", ".."])
def test_a_run_name_that_would_leave_logdir_is_refused(tmp_path, name):
    logdir = tmp_path / "deep" / "logs"
    name = str(tmp_path / "abs") if name == "ABS" else name
    code, _, err = cli(*LINE, "--epochs", "1", "--logdir", str(logdir), "--run-name", name)
    assert code == 2
    one_line(err, "--run-name", "no path separator, no '..'")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "abs") and not logdir.exists()


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_range_is_bad_input(tmp_path, seed):
    code, _, err = cli(*LINE, "--epochs", "1", "--logdir", str(tmp_path), "--seed", seed)
    assert code == 2
    one_line(err, f"--seed {seed} is outside 0 to 4294967295")


# --- damaged summary.json ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["{not json", "[1, 2]"])
def test_a_damaged_summary_then_resume_of_a_finished_run_is_one_line(tmp_path, damage):
    flags = [*LINE, "--epochs", "1", "--logdir", str(tmp_path), "--run-name", "r"]
    assert cli(*flags)[0] == 0
    assert os.stat(tmp_path / "r" / ".lock").st_mode & 0o077 == 0   # the lock file is private (0600)
    (tmp_path / "r" / "summary.json").write_text(damage)
    code, _, err = cli(*flags, "--resume")
    assert code == 2
    one_line(err, "summary.json", "is damaged", "delete it")
    assert (tmp_path / "r" / "summary.json").read_text() == damage
    (tmp_path / "r" / "summary.json").unlink()   # the fix the line names works
    code, out, _ = cli(*flags, "--resume")
    assert code == 0 and "the run is complete" in out


def test_doctor_on_a_summary_that_is_not_an_object_is_one_line(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text("[1, 2]")
    done = subprocess.run([sys.executable, "-m", "fastcore.profile", "doctor", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    one_line(done.stderr.strip().splitlines(), "summary.json", "not a JSON object")


# --- cached measurements -------------------------------------------------------------------------------------

LARGE = calibrate.entry("float32", "xla", (calibrate.LARGE,) * 3)


def write_cache(cache, entries: dict, raw: str | None = None):
    text = raw or json.dumps({calibrate.machine_key(): entries})
    (cache / "calibration.json").write_text(text)


@pytest.mark.parametrize("bad", ["0", "1e30", "-5", "NaN", "null", '"fast"'])
def test_an_implausible_cached_peak_is_measured_again(cache, monkeypatch, bad):
    raw = '{"%s": {"%s": {"gflops": %s}, "%s": {"gflops": %s}}}' % (
        calibrate.machine_key(), LARGE, bad, calibrate.entry("float32", "graph", (calibrate.LARGE,) * 3), bad)
    write_cache(cache, {}, raw)
    asked = []
    monkeypatch.setattr(calibrate, "_measure_in_child", lambda entries: asked.append(entries) or calibrate.Measured(
        {calibrate.entry(*e): 50.0 for e in entries}, None))
    top = calibrate.ceiling("float32")
    assert len(asked) == 1 and top["gflops"] == 50.0 and not top["cached"]
    assert os.stat(cache / "calibration.json.lock").st_mode & 0o077 == 0
    assert strict(cache / "calibration.json")[calibrate.machine_key()][LARGE]["gflops"] == 50.0
    line = tensorboard.final_lines({"utilisation": 0.5, "achieved_gflops": 25.0, "flops_per_example": 1e6,
                                    "step_time_ms": 1.0, "peak": {**top, "dtype": "float32"}})[0]
    assert line.startswith("utilisation 50%") and "of 50 GFLOP/s peak" in line


def test_an_implausible_fresh_measurement_leaves_utilisation_out_with_a_reason(cache, monkeypatch):
    monkeypatch.setattr(calibrate, "_measure_in_child", lambda entries: calibrate.Measured(
        {calibrate.entry(*e): 1e30 for e in entries}, None))
    with pytest.raises(calibrate.Unavailable, match="outside what"):
        calibrate.ceiling("float32")
    out = tensorboard.utilisation(1e6, 1000.0, "float32")
    assert "utilisation" not in out and "outside what" in out["utilisation_left_out"]
    assert not (cache / "calibration.json").exists()   # an implausible figure is never cached


def test_a_run_whose_ceiling_is_implausible_prints_no_utilisation_figure(tmp_path, cache, monkeypatch):
    write_cache(cache, {LARGE: {"gflops": -5}})
    monkeypatch.setattr(calibrate, "_measure_in_child", lambda entries: calibrate.Measured(
        {calibrate.entry(*e): 0.0 for e in entries}, None))
    code, out, err = cli(*LINE, "--epochs", "6", "--steps-per-call", "1", "--logdir", str(tmp_path), "--run-name", "r")
    assert code == 0 and not err, err
    assert "utilisation: left out (the " in out and "GFLOP/s peak" not in out and "utilisation -" not in out
    summary = strict(tmp_path / "r" / "summary.json")
    assert "utilisation" not in summary and summary["utilisation_left_out"]


@pytest.mark.parametrize("bad", [{"one": 0, "all": 0}, {"one": -1.0, "all": 1e-5}, {"one": 1e-30, "all": 1e-30},
                                 {"one": 1e-5}])
def test_an_implausible_cached_thread_timing_is_timed_again(cache, monkeypatch, bad):
    config = planning.RunConfig("mnist")
    calibrate.store(threads.cache_key(config), bad)
    timed = []
    monkeypatch.setattr(threads, "_time_in_child", lambda count, fields, scratch: timed.append(count) or
                        ((1e-5, None) if count == 1 else (2e-5, None)))
    count, why = threads.choose(config)
    assert timed == [1, 0] and count == 1
    assert why == "100,000 examples/s on 1 thread, 50,000 on all, the step timed now"
    assert calibrate.cached(threads.cache_key(config)) == {"one": 1e-5, "all": 2e-5}


def test_threads_auto_leaves_nothing_in_the_temp_directory(tmp_path, data_dir):
    """Subprocess with a fresh TMPDIR; the cache holds a zero timing for this configuration (re-timed)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = [*MNIST, "--data-dir", data_dir, "--epochs", "1", "--logdir", str(tmp_path / "logs")]
    calibrate.store(threads.cache_key(config_from_args(parser().parse_args(argv))), {"one": 0, "all": 0})
    proc = start(*argv, env={"TMPDIR": str(scratch)})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "the step timed now" in out and "Traceback" not in err
    assert os.listdir(scratch) == []


# --- summary.json is strict JSON -----------------------------------------------------------------------------

def test_a_non_finite_figure_is_written_as_null_and_named(tmp_path):
    summary = {"train_loss": float("nan"), "history": [{"steps": 4, "eval_loss": 0.5},
                                                       {"steps": 8, "eval_loss": float("nan"), "eval_x": float("-inf")}],
               "eval": {"loss": float("inf")}}
    atomic.write_json(str(tmp_path / "summary.json"), summary)
    written = strict(tmp_path / "summary.json")
    assert written["train_loss"] is None and written["history"][1]["eval_loss"] is None
    assert written["history"][0]["eval_loss"] == 0.5 and written["eval"]["loss"] is None
    assert written["nonfinite"] == {"train_loss": "nan", "history[1].eval_loss": "nan", "history[1].eval_x": "-inf",
                                    "eval.loss": "inf"}
    assert math.isnan(summary["train_loss"])   # the caller's figures are left as they were


# --- signals -------------------------------------------------------------------------------------------------

def test_a_sigint_during_verify_is_one_line_and_130(tmp_path, data_dir):
    proc = start(*MNIST, "--data-dir", data_dir, "--batch-size", "1", "--verify", "20000", "--threads", "1",
                 "--logdir", str(tmp_path), "--run-name", "r")
    wait_for_line(proc, "threads:")   # printed just before verify starts
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    one_line(err.strip().splitlines(), "stopped by SIGINT during the run", "no checkpoint was written")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_signal_after_the_last_call_is_delivered_when_the_run_ends():
    class Delivered(Exception):
        pass

    def handler(signum, frame):
        raise Delivered(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Delivered):
            with runguard.StopSignals() as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                assert stop.received == signal.SIGTERM   # recorded, not raised, while the run goes on
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


SECOND_SIGNAL = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, keras
    import fastcore

    class TwoSignals(fastcore.Callback):
        def on_{hook}(self, loop, logs):
            if loop.steps_done >= {at}:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    trainer = fastcore.Trainer(model, keras.optimizers.SGD(0.01), loss="mse", steps_per_call=1, preflight=False)
    trainer.fit(x, x[:, :1], batch_size=8, epochs=4, run_dir=sys.argv[1], callbacks=[TwoSignals()], verbose=False)
""")


@pytest.mark.parametrize("hook, at, expected", [("call_end", 1, "no checkpoint had been written"),
                                                ("epoch_end", 8, "ckpt-8', is intact")])
def test_a_second_signal_says_which_checkpoint_is_on_disk(tmp_path, hook, at, expected):
    done = subprocess.run([sys.executable, "-c", SECOND_SIGNAL.format(hook=hook, at=at), str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 143, done.stderr
    line = [l for l in done.stderr.splitlines() if "stopped at once" in l]
    assert len(line) == 1 and "by a second SIGTERM" in line[0] and expected in line[0], done.stderr
    assert "Traceback" not in done.stderr


def test_a_sigterm_inside_the_profile_window_still_writes_the_trace(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    proc = start(*MNIST, "--data-dir", data_dir, "--epochs", "400", "--steps-per-call", "4", "--checkpoint-every", "8",
                 "--profile-steps", "2:3000", "--threads", "1", "--logdir", str(tmp_path), "--run-name", "r")
    deadline = time.time() + 180
    while not list((run_dir / "checkpoints").glob("ckpt-16.index")):   # well inside the window
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    one_line(err.strip().splitlines(), "stopped by SIGTERM at step")
    profile = strict(run_dir / "summary.json")["profile"]
    assert profile["dir"] and profile["traced_steps"]   # (from step 5: the first call compiles and is left out)
    traces = [f for f in os.listdir(profile["dir"]) if f.endswith(".xplane.pb")]
    assert traces and all(os.path.getsize(os.path.join(profile["dir"], f)) > 0 for f in traces)
