"""Seeing inside a run: TensorBoard scalars and profile traces read back through TensorBoard's own HTTP
API, the meter's figures in summary.json, the trace ledger's retrace report, and the doctor."""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import keras
import pytest
import tensorflow as tf

from conftest import ROOT
from helpers import stop, train

from fastcore.engine.step import Engine
from fastcore.observe import calibrate, doctor as profile, tensorboard as profiling
from fastcore.tasks import models
from fastcore.engine.loss_step import loss_eval, loss_step

HIGGS_RUN = ["--dataset", "higgs", "--train-split", "train[:2000]", "--eval-split", "train[2000:3000]",
             "--epochs", "3", "--steps-per-call", "1", "--profile-steps", "2:4", "--run-name", "r1",
             "--precision", "float32"]   # explicit: auto is decided per machine
CALLS = 12   # 2000 examples / batch 500 = 4 steps an epoch, 3 epochs, 1 step per call
HIGGS_FLOPS = 6 * (28 * 512 + 3 * 512 * 512 + 512 * 1)


def run_module(module: str, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """`tensorboard --logdir` on 127.0.0.1 and a free port; JSON from its HTTP API."""

    def __init__(self, logdir: pathlib.Path):
        self.port = free_port()
        self.log = open(logdir.parent / "tensorboard.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
             "--port", str(self.port), "--reload_interval", "1"], stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params):
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
            if response.headers.get("Content-Encoding") == "gzip":   # the profile plugin gzips its JSON
                body = gzip.decompress(body)
        return json.loads(body)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"tensorboard exited: {self.process.returncode}"
            try:
                self.get("/data/plugins_listing")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise AssertionError(f"tensorboard not ready on port {self.port} after {timeout} s")

    def poll(self, fetch, done, timeout: float = 60):
        """fetch() until done(result): TensorBoard loads new event files on its own schedule."""
        deadline = time.monotonic() + timeout
        while True:
            result = fetch()
            if done(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def stop(self) -> None:
        stop(self.process)
        self.log.close()


@pytest.fixture(scope="module")
def higgs_run(tmp_path_factory, data_dir):
    """TensorBoard started on an empty logdir, then a short HIGGS run with a profile window, via the CLI."""
    root = tmp_path_factory.mktemp("observe")
    logdir = root / "logs"
    logdir.mkdir()
    # A module fixture runs before the per-test cache fixture: keep caches out of ~/.cache all the same.
    cache = {"FASTCORE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")}
    board = TensorBoard(logdir)
    try:
        board.wait_ready()
        result = run_module("fastcore.train", *HIGGS_RUN, "--data-dir", data_dir, "--logdir", str(logdir), env=cache)
        assert result.returncode == 0, result.stderr
        yield board, logdir, result
    finally:
        board.stop()
    assert board.process.poll() is not None


def test_tensorboard_serves_the_runs_scalars(higgs_run):
    board, logdir, _ = higgs_run
    epochs = {"epoch_loss": 3, "epoch_binary_accuracy": 3}   # one tag in both runs: one chart each (Keras' layout)
    steady = CALLS - 1 - 3   # the perf points leave out the compiling call and the 3 profiled ones
    expected = {"r1/train": {"batch_loss": CALLS, "learning_rate": CALLS, "perf/examples_per_sec": steady,
                             "perf/step_time_ms": steady, **epochs},
                "r1/validation": epochs}
    tags = board.poll(lambda: board.get("/data/plugin/scalars/tags"),
                      lambda t: all(set(want) <= set(t.get(run, {})) for run, want in expected.items()))
    assert {run: set(t) for run, t in tags.items()} == {run: set(want) for run, want in expected.items()}, tags
    for run, want in expected.items():
        for tag, points in want.items():
            series = board.poll(lambda: board.get("/data/plugin/scalars/scalars", run=run, tag=tag),
                                lambda s: len(s) >= points)
            assert len(series) == points, (run, tag, series)
    losses = board.get("/data/plugin/scalars/scalars", run="r1/train", tag="batch_loss")
    assert [step for _, step, _ in losses] == list(range(1, CALLS + 1))   # x axis: the optimizer step
    assert all(0 < value < 10 for _, _, value in losses)
    (_, _, lr), = board.get("/data/plugin/scalars/scalars", run="r1/train", tag="learning_rate")[:1]
    assert lr == pytest.approx(1e-3)
    for run in expected:
        accuracy = board.get("/data/plugin/scalars/scalars", run=run, tag="epoch_binary_accuracy")
        assert [step for _, step, _ in accuracy] == [4, 8, 12] and all(0 < v <= 1 for _, _, v in accuracy)


def test_profile_plugin_lists_the_trace_with_its_step_markers(higgs_run):
    board, logdir, result = higgs_run
    sessions = list((logdir / "r1" / "plugins" / "profile").iterdir())
    assert len(sessions) == 1 and list(sessions[0].glob("*.xplane.pb")), sessions
    runs = board.poll(lambda: board.get("/data/plugin/profile/runs"), lambda r: bool(r))
    assert runs == [f"r1/{sessions[0].name}"]
    tools = board.get("/data/plugin/profile/run_tools", run=runs[0])
    assert "trace_viewer@" in tools or "trace_viewer" in tools, tools
    assert "input_pipeline_analyzer" in tools, tools
    (host,) = board.get("/data/plugin/profile/hosts", run=runs[0], tag="input_pipeline_analyzer")
    tables = board.get("/data/plugin/profile/data", run=runs[0], tag="input_pipeline_analyzer", host=host["hostname"])
    step_table = next(t for t in tables if any(c.get("id") == "stepnum" for c in t.get("cols", [])))
    step_numbers = [int(row["c"][0]["v"].split()[-1]) for row in step_table["rows"]]
    assert step_numbers == [2, 3, 4]   # one profiler step marker per traced call, numbered by optimizer step
    # The output says where the trace is and how to view it.
    line = next(line for line in result.stdout.splitlines() if line.startswith("profile of steps 2-4: "))
    assert str(sessions[0]) in line and f"tensorboard --logdir {logdir}" in line
    assert f"scalars: {logdir / 'r1'}" in result.stdout


def test_summary_holds_the_meter_and_the_ledger(higgs_run):
    _, logdir, result = higgs_run
    s = json.loads((logdir / "r1" / "summary.json").read_text())
    assert s["steps"] == CALLS and s["compiled_calls"] == CALLS
    assert s["steady_calls"] == CALLS - 1 - 3   # the compile call and the 3 traced calls are left out
    assert 2_000 < s["examples_per_sec"] < 500_000
    assert 0 < s["step_time_ms"] < 1_000
    assert 0 <= s["input_wait_share"] < 0.5
    assert 0.05 < s["compile_seconds"] < 60
    # counted from the step's graph, within 1% of the textbook 6 x sum(in x out) for this MLP
    assert s["flops_per_example"] == pytest.approx(HIGGS_FLOPS, rel=0.01)
    peak = s["peak"]
    assert peak["dtype"] == "float32" and peak["path"] in ("xla", "graph") and 5 < peak["gflops"] < 20_000
    # the ceiling is the best of both paths at the large shape and the step's largest matmul (500x512x512)
    assert set(peak["measured"]) == {f"float32/{p}/{s}" for p in ("xla", "graph") for s in ("2048x2048x2048", "500x512x512")}
    assert peak["gflops"] == max(peak["measured"].values())
    assert s["achieved_gflops"] == pytest.approx(s["flops_per_example"] * s["examples_per_sec"] / 1e9)
    assert 0 < s["utilisation"] <= 1.0   # never above the ceiling
    assert s["utilisation"] == pytest.approx(min(1.0, s["achieved_gflops"] / peak["gflops"]))
    assert s["traces"] == {"train": 1, "eval": 1} and s["xla_compilations"] == {"train": 1, "eval": 1}
    assert s["retraced"] is False and s["retraces"] == []
    assert s["profile"]["steps"] == [2, 4] and s["profile"]["traced_steps"] == [2, 3, 4]
    out = result.stdout
    assert "utilisation " in out and "GFLOP/s peak (float32 " in out and "best of XLA and oneDNN" in out
    assert "traces: train 1, eval 1; XLA compilations: train 1, eval 1; no retrace" in out
    assert result.stderr == ""


def test_float16_logs_the_loss_scale_and_summary_every_thins_the_points(data_dir, tmp_path):
    summary, _ = train("higgs", data_dir, train_split="train[:2000]", eval_split="train[2000:3000]", epochs=2,
                       steps_per_call=1, precision="float16", summary_every=3, logdir=str(tmp_path), run_name="f16")
    _, points = profile.scalar_points(str(tmp_path / "f16" / "train"))
    # 8 calls, every 3rd and the last: calls 3, 6, 8; the first call (compile) has no throughput point.
    assert points["batch_loss"] == 3 and points["loss_scale"] == 3 and points["perf/examples_per_sec"] == 3
    assert profile.scalar_points(str(tmp_path / "f16" / "validation"))[1]["epoch_loss"] == 2
    assert summary["peak"]["dtype"] == "float16" and 0 < summary["utilisation"] <= 1.0


def test_a_retrace_is_reported_with_the_argument_that_changed():
    model = models.build(models.MLPSpec(3, (4,)), "keras-functional", models.Regularization(), "float32",
                         tf.float32, seed=0)
    loss = keras.losses.MeanSquaredError()
    step = Engine({"model": model}, {"optimizer": keras.optimizers.SGD(0.1)}, loss_step(model, loss),
                  eval_fn=loss_eval(model, loss, {}), global_batch_size=8, mode="xla")
    step.train_one((tf.zeros([8, 3]), tf.zeros([8, 1])))
    step.train_one((tf.ones([8, 3]), tf.ones([8, 1])))   # same signature: no retrace
    assert step.ledger.retraces() == []
    step.train_one((tf.zeros([5, 3]), tf.zeros([5, 1])))   # a ragged last batch: a retrace
    assert step.ledger.counts() == {"train": 2}
    assert step.ledger.retraces() == ["train traced 2 times: batch: (float32[8, 3], float32[8, 1]) -> "
                                      "(float32[5, 3], float32[5, 1])"]
    summary = {"retraced": True, "retraces": step.ledger.retraces()}
    warning = profiling.retrace_warning(summary)
    assert warning.startswith("fastcore-train: WARNING: RETRACED") and "float32[8, 3]" in warning
    assert profiling.retrace_warning({"retraced": False}) is None


def test_cached_calibration(monkeypatch, tmp_path, quiet_timing):
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path))
    first = calibrate.ceiling("float32", [(500, 512, 512), (500, 28, 512)])
    assert not first["cached"] and 5 < first["gflops"] < 20_000
    assert len(first["measured"]) == 4   # both paths x (the large shape, the step's largest)
    assert first["gflops"] == max(first["measured"].values())
    again = calibrate.ceiling("float32", [(500, 512, 512)])
    assert again["cached"] and again["gflops"] == pytest.approx(first["gflops"], rel=1e-3)
    stored = json.loads((tmp_path / "calibration.json").read_text())
    assert list(stored) == [calibrate.machine_key()] and tf.__version__ in calibrate.machine_key()


def test_a_profile_window_in_k_step_calls_traces_whole_calls_and_skips_the_compiling_call(data_dir, tmp_path):
    def run(name, window):
        return run_module("fastcore.train", "--dataset", "higgs", "--train-split", "train[:2000]", "--eval-split",
                          "train[2000:3000]", "--epochs", "3", "--steps-per-call", "2", "--precision", "float32",
                          "--profile-steps", window, "--run-name", name, "--data-dir", data_dir, "--logdir", str(tmp_path))
    result = run("r1", "2:4")
    assert result.returncode == 0, result.stderr
    s = json.loads((tmp_path / "r1" / "summary.json").read_text())
    # step 2 lies in the first call (steps 1-2, which compiles): left out; the call of steps 3-4 is traced as
    # it runs (one K-step call, one marker), and no other function is compiled for it
    p = s["profile"]
    assert p["asked"] == [2, 4] and p["steps"] == [3, 4] and p["markers"] == [3] and p["first_call_left_out"]
    assert s["traces"] == {"train": 1, "eval": 1} and not s["retraced"]
    assert len(profiling.profile_sessions(str(tmp_path / "r1"))) == 1
    assert "profile of steps 3-4 (asked 2-4: the first call compiles and is left out (1:B includes it)):" in result.stdout
    moved = run("r2", "2:2")   # wholly inside the compiling call: the next call is traced instead
    assert moved.returncode == 0, moved.stderr
    m = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert m["profile"]["asked"] == [2, 2] and m["profile"]["steps"] == m["profile"]["traced_steps"] == [3, 4]
    assert "profile of steps 3-4 (asked 2-2: the first call compiles and is left out" in moved.stdout


def test_concurrent_runs_share_one_calibration(tmp_path):
    """Two processes needing the same ceiling at once: one measures, the other waits and reads it."""
    code = ("import json; from fastcore.observe import calibrate, timing; "
            "timing.SPREAD = timing.BUSY = float('inf'); "   # no neighbour: the timing is cached
            "print(json.dumps(calibrate.ceiling('float32', [(256, 256, 256)])))")
    env = {**os.environ, "FASTCORE_CACHE_DIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert outs[0]["gflops"] == outs[1]["gflops"] and outs[0]["measured"] == outs[1]["measured"]
    assert sorted(o["cached"] for o in outs) == [False, True]


@pytest.mark.parametrize("window, message", [
    ("2-4", "--profile-steps '2-4' is not A:B"),
    ("2:400", "ends after the run's last step (12)"),
])
def test_bad_profile_window_is_one_line_and_exit_2(data_dir, tmp_path, window, message):
    result = run_module("fastcore.train", *HIGGS_RUN[:-4], "--profile-steps", window, "--data-dir", data_dir,
                        "--logdir", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("window, message", [("0:3", "need 1 <= A <= B"), ("4:2", "need 1 <= A <= B")])
def test_window_parsing(window, message):
    assert profiling.parse_window("2:4", 12) == (2, 4)
    with pytest.raises(profiling.UsageError, match=message):
        profiling.parse_window(window, 12)


def test_doctor_on_a_healthy_logdir(higgs_run):
    _, logdir, _ = higgs_run
    session = next((logdir / "r1" / "plugins" / "profile").iterdir())
    files_before = sorted(p.name for p in session.iterdir())
    result = run_module("fastcore.profile", "doctor", str(logdir))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "tensorboard-plugin-profile" in out and "agree" in out and "PROBLEM" not in out
    assert "run r1\n" in out and "run r1/train" not in out   # its train/ and validation/ are part of it
    assert "scalars: train/: 6 tags" in out and "batch_loss (12)" in out and "scalars: validation/: 2 tags" in out
    assert "train/ and validation/ share 2 tag(s) (epoch_binary_accuracy, epoch_loss)" in out
    assert "profile r1/" in out and "steps 2-4 in 3 calls of 1" in out and "input_pipeline_analyzer" in out
    assert "is one compiled call of 1 step (one step marker per call)" in out
    assert f"tensorboard --logdir {logdir}" in out and out.rstrip().endswith("healthy")
    assert "offline, this trace shows: the Trace Viewer; the Overview's Performance Summary" in out
    assert "offline blank (drawn by a chart script the page fetches from the internet): the Overview's" in out
    # The doctor only looks: nothing new next to the trace (the converter writes HLO files where it reads).
    assert sorted(p.name for p in session.iterdir()) == files_before


def test_doctor_explains_an_empty_logdir(tmp_path):
    result = run_module("fastcore.profile", "doctor", str(tmp_path))
    assert result.returncode == 1
    assert "PROBLEM  no runs under" in result.stdout and "No profile data was found" in result.stdout


def test_doctor_finds_a_trace_that_was_never_written(tmp_path):
    (tmp_path / "crashed" / "plugins" / "profile" / "2026_01_01_00_00_00").mkdir(parents=True)
    result = run_module("fastcore.profile", "doctor", str(tmp_path))
    assert result.returncode == 1
    assert "run crashed" in result.stdout and "never stopped" in result.stdout


def test_doctor_missing_logdir_is_one_line_and_exit_2(tmp_path):
    result = run_module("fastcore.profile", "doctor", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0] and "does not exist" in lines[0]
