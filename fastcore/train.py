"""Command line: `python -m fastcore.train --dataset higgs --xla`.

Exit codes: 0 done, 1 `--verify` or the pre-flight check failed, 2 bad input (one line on stderr, no
traceback), 3 NaN/Inf stopped the run (the last checkpoint holds good weights), 130 / 143 stopped by
SIGINT / SIGTERM, anywhere (one line; in training after saving a checkpoint), 70 internal error (one line
naming the saved traceback).
The flags live in fastcore/cli/args.py, the run in fastcore/cli/session.py.
"""
from __future__ import annotations

import sys

from fastcore.cli import quiet
from fastcore.cli.args import parser
from fastcore.engine import runguard
from fastcore.observe import phases


def main(argv: list[str] | None = None) -> int:
    runguard.raise_on_signals()   # from the first moment: a signal is one line, never a traceback
    quiet.silence_native_logs()
    try:
        return run_cli(argv)
    except runguard.Signalled as e:   # before the run began (TensorFlow's import); session.main handles the rest
        print(f"fastcore-train: stopped by {e.name} before the run began; nothing was written", file=sys.stderr)
        return e.exit_code


def run_cli(argv: list[str] | None = None) -> int:
    """Parse and run; the exit code is returned, not raised (so tests can call it in-process)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:   # --help (0) or a malformed command line (2, already explained)
        return e.code
    with phases.speaking(sys.stdout):   # every slow phase is announced, from the first second
        with phases.phase(f"{args.task}: starting TensorFlow", delay=0):   # the first line, in about 0.3 s
            from fastcore.cli import session   # imports TensorFlow: after the arguments are known to be well-formed
        return session.main(args)


if __name__ == "__main__":
    sys.exit(main())
