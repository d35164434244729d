"""Keep TensorFlow's native start-up log lines out of the CLI's output.

TensorFlow's C++ runtime writes notices (oneDNN, CUDA probing, absl pre-init warnings) straight
to file descriptor 2, and some appear even with TF_CPP_MIN_LOG_LEVEL=3. So file descriptor 2 is
pointed at /dev/null (or at $FASTCORE_TF_LOG, a file, for debugging) and Python's own stderr
keeps a private copy of the real one: our messages and Python tracebacks still reach the user.
Call before TensorFlow is imported.
"""
from __future__ import annotations

import os
import sys


def silence_native_logs() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    real_stderr = os.dup(2)
    sink = os.open(os.environ.get("FASTCORE_TF_LOG") or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(sink, 2)
    os.close(sink)
    sys.stderr = os.fdopen(real_stderr, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


def silence_python_logs() -> None:
    """TensorFlow's Python logger warns about things the CLI reports itself (retracing, unrestored
    checkpoint values after a refused resume); the CLI's own lines are the interface."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
