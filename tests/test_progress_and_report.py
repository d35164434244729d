"""What a user watches: progress lines in a log and on a terminal, train and validation curves on one
TensorBoard chart, and the report's PNG."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcore
from conftest import ROOT
from fastcore.observe import progress
from fastcore.options import FitOptions

STEPS_PER_EPOCH = 8   # 256 examples, batch 32; 2 steps per call: 4 calls an epoch


def tiny_fit(out, run_dir=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    trainer = fastcore.Trainer(model, keras.optimizers.Adam(1e-2), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                               metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)], mode="graph", steps_per_call=2,
                               preflight=False)
    return trainer.run(x, y, FitOptions(epochs=2, batch_size=32, run_dir=run_dir, out=out),
                       validation_data=(x[:64], y[:64]))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A two-epoch fit into a run folder, its progress going to a log (not a terminal), a line per call."""
    run_dir = str(tmp_path_factory.mktemp("progress") / "run")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress, "NON_TTY_INTERVAL", 0.0)
        result = tiny_fit(out, run_dir)
    return result, out.getvalue(), run_dir


def test_a_log_gets_plain_progress_lines_and_an_epoch_line(logged_run):
    result, text, _ = logged_run
    assert "\r" not in text and "\x1b" not in text   # nothing redrawn in a log file
    lines = text.splitlines()
    during = [line for line in lines if re.match(r"Epoch 1/2  [1-7]/8  ", line)]
    # the first call compiles (no rate yet); later ones carry the ETA, the current rate and every train figure
    assert [line.split("  ")[1] for line in during] == ["2/8", "4/8", "6/8"], lines
    assert re.match(r"Epoch 1/2  6/8  ETA \d+s  [\d,]+ ex/s  [\d.]+ ms/step  loss \d\.\d{4}  binary_accuracy "
                    r"\d\.\d{4}$", during[-1]), during
    ends = [line for line in lines if re.match(r"Epoch \d/2  8/8  \d+s  ", line)]
    assert len(ends) == 2 and ends[1].startswith("Epoch 2/2"), lines
    for line, epoch in zip(ends, result.history):
        assert re.search(r"[\d,]+ ex/s  [\d.]+ ms/step", line), line
        for name in ("train_loss", "train_binary_accuracy", "eval_loss", "eval_binary_accuracy"):
            assert f"{name} {epoch[name]:.4f}" in line, (name, line)


def test_the_rate_is_the_current_one_and_leaves_out_uncounted_calls():
    rate = progress.Rate(window=5.0)
    assert rate.step_seconds() is None
    rate.add(0.0, 2, 2.0)   # slow calls long ago...
    rate.add(1.0, 2, 2.0)
    rate.add(10.0, 2, 0.02)   # ...are out of the window: only recent calls count
    rate.add(11.0, 2, 0.02)
    assert rate.step_seconds() == pytest.approx(0.01)
    rate.add(100.0, 4, 0.08)   # at least the latest call, however long ago the one before
    assert rate.step_seconds() == pytest.approx(0.02) and len(rate.calls) == 1


def test_a_terminal_gets_one_line_redrawn_in_place():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))   # 200 columns
    chunks = []
    reader = threading.Thread(target=lambda: _drain(leader, chunks), daemon=True)
    reader.start()
    terminal = os.fdopen(follower, "w")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress, "TTY_INTERVAL", 0.0)
        tiny_fit(terminal)
    terminal.close()   # the reader sees the end of the output
    reader.join(timeout=30)
    text = b"".join(chunks).decode()
    assert "\rEpoch 1/2  2/8 [=====>              ]  loss " in text, repr(text)   # the compiling call: no rate
    assert re.search(r"\rEpoch 1/2  4/8 \[==========> +\]  ETA \d+s  [\d,]+ ex/s  [\d.]+ ms/step  loss \d", text)
    assert re.search(r"ms/step  loss \d\.\d{4}  binary_accuracy \d\.\d{4}\x1b\[K", text)   # every train figure
    assert "\rEpoch 1/2  8/8 [====================]" in text   # drawn when the epoch's last call ends
    assert "\x1b[K" in text   # each redraw clears what a longer line left
    kept = [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    assert [line[:14] for line in kept if line.startswith("Epoch")] == ["Epoch 1/2  8/8", "Epoch 2/2  8/8"]


def test_a_narrow_terminal_keeps_the_figures_and_a_stopped_run_ends_the_line():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))   # 60 columns
    terminal = os.fdopen(follower, "w")
    meter = types.SimpleNamespace(steady_calls=0, last_wait=0.001, last_compute=0.009)
    loop = types.SimpleNamespace(total_steps=200, steps_per_epoch=100, steps_per_call=10, batch_size=50, meter=meter,
                                 steps_done=0, epoch_index=0, ending_epoch=False, engine=types.SimpleNamespace(step_fn=None))
    now = [0.0]
    with progress.Progress(terminal, clock=lambda: now[0]) as shown:
        shown.on_train_begin(loop)
        for calls in (1, 2, 3):   # the first compiles; then two steady calls of 10 steps in 10 ms
            now[0] += 1.0
            loop.steps_done, meter.steady_calls = 10 * calls, calls - 1
            shown.on_call_end(loop, {"loss": 0.25})
        # the run stops here (a signal): leaving the `with`, the redrawn line is ended
    text = b""
    while select.select([leader], [], [], 1.0)[0]:
        text += os.read(leader, 4096)
    terminal.close()
    os.close(leader)
    text = text.decode()
    last = text.split("\r")[-2]   # the last redraw (then "\r\n" of the ended line)
    # 59 columns: the bar and then whole trailing fields are left out (`loss 0.2500` would make 65)
    assert last == "Epoch 1/2  30/100  ETA 0s  50,000 ex/s  1.00 ms/step\x1b[K", repr(text)
    assert text.endswith("\x1b[K\r\n")


def test_verbose_2_keeps_to_the_epoch_lines():
    out, now = io.StringIO(), [0.0]
    meter = types.SimpleNamespace(steady_calls=0, last_wait=0.0, last_compute=0.01)
    loop = types.SimpleNamespace(total_steps=20, steps_per_epoch=20, steps_per_call=10, batch_size=50, meter=meter,
                                 steps_done=0, epoch_index=0, ending_epoch=False, engine=types.SimpleNamespace(step_fn=None))
    shown = progress.Progress(out, live=False, clock=lambda: now[0])
    shown.on_train_begin(loop)
    for calls in (1, 2):
        now[0] += 60.0   # long past any interval
        loop.steps_done, meter.steady_calls, loop.ending_epoch = 10 * calls, calls - 1, calls == 2
        shown.on_call_end(loop, {"loss": 0.5})
    shown.on_epoch_end(loop, {"epoch": 1.0, "steps": 20, "train_loss": 0.5})
    assert out.getvalue() == "Epoch 1/1  20/20  2m00s  50,000 ex/s  1.00 ms/step  train_loss 0.5000\n"


def _drain(fd: int, chunks: list) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:   # EIO: the terminal's other end closed
            return
        if not data:
            return
        chunks.append(data)


def events(folder: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(folder)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return out


def test_train_and_validation_are_two_runs_with_the_same_tags(logged_run):
    result, _, run_dir = logged_run
    assert sorted(d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d))
                  and d != "checkpoints") == ["train", "validation"]
    assert not [f for f in os.listdir(run_dir) if ".tfevents." in f]
    train, validation = events(os.path.join(run_dir, "train")), events(os.path.join(run_dir, "validation"))
    assert set(validation) == {"epoch_loss", "epoch_binary_accuracy"}
    assert set(validation) < set(train)   # one tag each, so TensorBoard draws both runs on one chart
    assert {"batch_loss", "learning_rate", "perf/examples_per_sec", "perf/step_time_ms"} < set(train)
    for tag in validation:
        assert [step for step, _ in train[tag]] == [step for step, _ in validation[tag]] == [8, 16]
    assert [v for _, v in train["epoch_loss"]] == pytest.approx([h["train_loss"] for h in result.history], rel=1e-6)
    assert [v for _, v in validation["epoch_binary_accuracy"]] == pytest.approx(
        [h["eval_binary_accuracy"] for h in result.history], rel=1e-6)
    assert [step for step, _ in train["batch_loss"]] == [2, 4, 6, 8, 10, 12, 14, 16]


def profile_cli(*args, code=None):
    argv = [sys.executable, "-m", "fastcore.profile", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_report_draws_the_runs_curves_into_a_png(logged_run):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    _, _, run_dir = logged_run
    result = profile_cli("report", run_dir)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    path = os.path.join(run_dir, "report.png")
    assert result.stdout.strip() == f"report: {path}"
    pixels = matplotlib_image.imread(path)
    assert pixels.shape[:2] == (400, 1200)   # 12 x 4 inches at 100 dpi
    assert pixels[..., :3].std() > 0.05   # curves, text and axes, not a blank canvas
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]


def test_the_report_without_matplotlib_says_how_to_install_it(logged_run, tmp_path):
    _, _, run_dir = logged_run
    hide = ("import sys; sys.modules['matplotlib'] = None; from fastcore import profile; "
            "sys.exit(profile.main(sys.argv[1:]))")
    before = os.path.getmtime(os.path.join(run_dir, "summary.json"))
    result = profile_cli("report", str(tmp_path), code=hide)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "matplotlib" in line and "pip install 'fastcore[plot]'" in line and "Traceback" not in result.stderr
    assert os.path.getmtime(os.path.join(run_dir, "summary.json")) == before and not list(tmp_path.iterdir())


def test_a_report_of_a_folder_without_a_summary_is_one_line_and_exit_2(tmp_path):
    result = profile_cli("report", str(tmp_path))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "holds no summary.json" in line and str(tmp_path) in line
    assert not list(tmp_path.iterdir())
