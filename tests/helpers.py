"""Running real configurations in-process (the CLI's code path without the process start-up)."""
from __future__ import annotations

import io
import tempfile

from fastcore.cli import plan as run, session


def train(task: str, data_dir: str | None = None, **flags):
    """Train `task` with CLI-equivalent flags (run directory in a temp folder, float32 unless given);
    returns (summary, engine)."""
    flags.setdefault("logdir", tempfile.mkdtemp(prefix="fastcore-test-"))
    flags.setdefault("precision", "float32")   # `auto` is decided per machine; test_precision covers it
    plan = run.plan(run.RunConfig(task, data_dir=data_dir, **flags))
    return session.train_and_summarize(plan, out=io.StringIO())
