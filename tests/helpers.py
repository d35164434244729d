"""Running real configurations in-process (the CLI's code path without the process start-up)."""
from __future__ import annotations

import contextlib
import io
import subprocess
import tempfile

from fastcore.cli import plan as run, session


def train(task: str, data_dir: str | None = None, **flags):
    """Train `task` with CLI-equivalent flags (run directory in a temp folder, float32 unless given);
    returns (summary, engine)."""
    flags.setdefault("logdir", tempfile.mkdtemp(prefix="fastcore-test-"))
    flags.setdefault("precision", "float32")   # `auto` is decided per machine; test_precision covers it
    plan = run.plan(run.RunConfig(task, data_dir=data_dir, **flags))
    return session.train_and_summarize(plan, out=io.StringIO())


def cli(*argv):
    """(exit code, stdout, stderr lines) of an in-process CLI run."""
    from fastcore.train import run_cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(list(argv))
    return code, out.getvalue(), [line for line in err.getvalue().splitlines() if line.strip()]


def one_line(err, *expected):
    """The one stderr line, holding every `expected` text and no traceback."""
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """Terminate a server the test started, killing it if it does not end within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
