"""The helper processes a run starts (the `--threads auto` timing, the matmul calibration) end with it.

A signal that stops the run while it waits for a child must not leave the child behind: Ctrl-C reaches
the whole process group, but `kill -INT` of the run's pid alone does not reach the child, and killing a
child outright orphans its own children and skips its exit handlers. So the child is passed SIGINT and
given GRACE_SECONDS to end its own way (its children and temp files with it) before it is killed, and
the run says its one line only after that.
Each child's TMPDIR is a private folder removed when it ends: TensorFlow's autograph writes its generated
sources there (`__autograph_generated_file*.py`) and deletes them only at a normal exit, so a killed
child's go with the folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile

GRACE_SECONDS = 10.0


def run(argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`argv` to its end with text stdout and stderr captured, as subprocess.run (TimeoutExpired after
    `timeout` s); on any exception here, a signal's included, the child is ended first."""
    with tempfile.TemporaryDirectory(prefix="fastcore-child-") as scratch:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**(os.environ if env is None else env), "TMPDIR": scratch})
        try:
            out, err = child.communicate(timeout=timeout)
        except BaseException:
            _end(child)
            raise
        return subprocess.CompletedProcess(argv, child.returncode, out, err)


def _end(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGINT)   # a terminal's Ctrl-C sent it already; a signal to the run alone did not
    try:
        child.communicate(timeout=GRACE_SECONDS)   # reads its pipes, so it cannot block writing them
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
