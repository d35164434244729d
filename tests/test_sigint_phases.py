"""Ctrl-C in every phase of a CLI run outside the training loop: one line naming the phase, exit 130.

Each test starts `python -m fastcore.train` in a process group of its own, with a fresh FASTCORE_CACHE_DIR
(so the timing phases really run) and a private TMPDIR, waits until the run is in the phase, as seen from
outside in /proc (a module's import mapped, a temp file, a child process, a compiled call's thread), and
sends SIGINT to the whole group, as a terminal's Ctrl-C does. Then: exit 130, exactly one line on stderr
naming the phase, no traceback, no process of the group left, nothing left in TMPDIR.
(Ctrl-C during --verify and in training: tests/test_trust_files.py, tests/test_faults.py. During the pre-flight the
signal is kept until its compile ends, then the run stops before its first step.)
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from helpers import one_line

MNIST = ["--dataset", "mnist", "--train-split", "test[:256]", "--eval-split", "test[256:512]"]


def processes(group: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in a process group."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode()
        except OSError:   # ended meanwhile
            continue
        if int(pgrp) == group and state != "Z":
            found.append((int(name), command))
    return found


def compiling(pid: int) -> bool:
    """Whether a process has run a compiled XLA call (TensorFlow's XLA thread pool exists)."""
    try:
        return any(open(f"/proc/{pid}/task/{t}/comm").read().startswith("tf_XLA") for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


class Run:
    """`python -m fastcore.train *argv` in a process group of its own; stdout read as it comes."""

    def __init__(self, tmp_path, *argv):
        self.cache, self.tmp = tmp_path / "cache", tmp_path / "tmp"
        self.cache.mkdir(exist_ok=True)
        self.tmp.mkdir()
        env = {**os.environ, "FASTCORE_CACHE_DIR": str(self.cache), "TMPDIR": str(self.tmp)}
        self.proc = subprocess.Popen([sys.executable, "-m", "fastcore.train", *argv, "--logdir", str(tmp_path / "logs"),
                                      "--run-name", "r"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out = []
        threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True).start()

    def children(self, module: str) -> list[int]:
        return [pid for pid, command in processes(self.proc.pid) if f"-m {module} " in command]

    def wait_until(self, condition, timeout=300):
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, (self.proc.returncode, self.out, self.proc.stderr.read())
            assert time.time() < deadline, f"the phase was not reached in {timeout} s: {self.out}"
            time.sleep(0.005)

    def ctrl_c(self) -> list[str]:
        """SIGINT to the run's process group; its stderr lines once it has ended."""
        os.killpg(self.proc.pid, signal.SIGINT)
        err = self.proc.stderr.read()
        self.proc.wait(timeout=120)
        return [line for line in err.splitlines() if line.strip()]

    def ended_cleanly(self) -> None:
        assert self.proc.returncode == 130, (self.proc.returncode, self.out)
        assert processes(self.proc.pid) == []   # nothing outlives the run's line
        assert os.listdir(self.tmp) == []


def test_while_tensorflow_is_imported(tmp_path, data_dir):
    run = Run(tmp_path, *MNIST, "--data-dir", data_dir)

    def importing():
        try:
            return "libtensorflow_framework" in open(f"/proc/{run.proc.pid}/maps").read()
        except OSError:
            return False
    run.wait_until(importing)
    one_line(run.ctrl_c(), "stopped by SIGINT before the run began; nothing was written")
    run.ended_cleanly()


def test_while_the_row_cache_is_built(tmp_path, data_dir):
    folder = tmp_path / "data" / "higgs"
    folder.mkdir(parents=True)
    with gzip.open(os.path.join(data_dir, "higgs", "HIGGS-sample.csv.gz")) as f:
        (folder / "HIGGS.csv").write_bytes(f.read() * 10)   # ~0.6 s to parse, under its progress line's 2 s
    run = Run(tmp_path, "--dataset", "higgs", "--data-dir", str(tmp_path / "data"), "--threads", "1")
    run.wait_until(lambda: any(name.endswith(".tmp") for name in os.listdir(run.cache)))   # the cache being written
    one_line(run.ctrl_c(), "stopped by SIGINT while preparing the run (preparing data: higgs from ",
             "; no checkpoint was written")
    run.ended_cleanly()
    assert [name for name in os.listdir(run.cache) if name.startswith("HIGGS")] == []   # no half-written cache


@pytest.mark.parametrize("to", ["group", "run alone"])   # Ctrl-C, or `kill -INT` of the run's pid only
def test_while_the_threads_are_timed_in_child_processes(tmp_path, data_dir, to):
    run = Run(tmp_path, *MNIST, "--data-dir", data_dir, "--precision", "float32")
    run.wait_until(lambda: any(compiling(pid) for pid in run.children("fastcore.cli.threads")))   # timing its step
    if to == "group":
        err = run.ctrl_c()
    else:
        run.proc.send_signal(signal.SIGINT)
        err = run.proc.stderr.read().splitlines()
        run.proc.wait(timeout=120)
    one_line(err, "stopped by SIGINT while preparing the run (--threads auto: timing the step on 1 thread and on all",
             "; no checkpoint was written")
    run.ended_cleanly()


def test_while_precision_auto_times_the_step(tmp_path, data_dir, monkeypatch):
    """Cached peaks that propose bfloat16 make auto time the model's own step, in the run's own process."""
    from fastcore.observe import calibrate
    monkeypatch.setenv("FASTCORE_CACHE_DIR", str(tmp_path / "cache"))   # the run's cache
    for path, gflops in (("xla", 60.0), ("graph", 60.0)):
        calibrate.store(calibrate.entry("float32", path, (calibrate.LARGE,) * 3), {"gflops": gflops})
    for path in ("xla", "graph"):
        calibrate.store(calibrate.entry("bfloat16", path, (calibrate.LARGE,) * 3), {"gflops": 600.0})
    run = Run(tmp_path, *MNIST, "--data-dir", data_dir, "--threads", "1", "--precision", "auto")
    lock = tmp_path / "logs" / "r" / ".lock"   # taken when training begins
    run.wait_until(lambda: compiling(run.proc.pid) and not lock.exists())
    one_line(run.ctrl_c(), "stopped by SIGINT while preparing the run (precision auto: timing the step in float32 and",
             "; no checkpoint was written")
    run.ended_cleanly()
    assert not lock.exists()


def test_while_the_machines_peak_is_measured_in_a_child(tmp_path, data_dir):
    run = Run(tmp_path, *MNIST, "--data-dir", data_dir, "--threads", "1", "--precision", "auto")
    run.wait_until(lambda: any(compiling(pid) for pid in run.children("fastcore.observe.calibrate")))
    one_line(run.ctrl_c(), "stopped by SIGINT while preparing the run (precision auto: timing the step in float32 and",
             "; no checkpoint was written")
    run.ended_cleanly()
    cache = run.cache / "calibration.json"
    assert not cache.exists() or isinstance(json.loads(cache.read_text()), dict)   # whole, never half-written


def test_during_the_report_while_the_peak_is_measured(tmp_path, data_dir):
    """Training is over (the report measures the ceiling for utilisation): the run says it is complete."""
    run = Run(tmp_path, *MNIST, "--data-dir", data_dir, "--threads", "1", "--precision", "float32", "--epochs", "4")
    run.wait_until(lambda: any(compiling(pid) for pid in run.children("fastcore.observe.calibrate")))
    line = one_line(run.ctrl_c(), "stopped by SIGINT after the last step; training is complete", "ckpt-32",
                    "summary.json is written")
    run.ended_cleanly()
    summary = json.loads((tmp_path / "logs" / "r" / "summary.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"bare {name} in summary.json"))
    assert summary["steps"] == 32 and summary["checkpoint"].endswith("ckpt-32") and summary["checkpoint"] in line
    assert "the matmul calibration was stopped by SIGINT" in summary["utilisation_left_out"]


def test_during_the_pre_flight(tmp_path, data_dir):
    """The signal is kept until the pre-flight ends (its compile runs on a helper thread), then the run stops before
    its first step. HIGGS' 4x512 MLP compiles for ~2-4 s on 2 cores, over the 1 s after which the phase announces
    itself, which is how the test sees the run is in it."""
    run = Run(tmp_path, "--dataset", "higgs", "--train-split", "train[:2000]", "--eval-split", "train[2000:2500]",
              "--data-dir", data_dir, "--threads", "1", "--precision", "float32")
    run.wait_until(lambda: any(line.startswith("pre-flight: compiled and eager on the first batch") for line in run.out))
    one_line(run.ctrl_c(), "fastcore-train: stopped by SIGINT during the pre-flight, before step 1; no checkpoint was written")
    run.ended_cleanly()
    checkpoints = tmp_path / "logs" / "r" / "checkpoints"
    assert not checkpoints.exists() or os.listdir(checkpoints) == []   # no step was taken, none saved
