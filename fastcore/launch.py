"""`python -m fastcore.launch --workers N -- <train args>`: N local workers of one multi-worker run.

Each worker is `python -m fastcore.train <train args> --strategy multi-worker` with its own TF_CONFIG
naming N free loopback ports; worker 0 is the chief (it writes the run's files). Output is streamed with
a `[worker i]` prefix. When a worker fails, the others are stopped (SIGTERM, then SIGKILL after
--stop-timeout seconds: a worker waiting for a peer inside TensorFlow ignores SIGTERM), so nothing is
left running and nothing hangs. The exit code is the chief's (see fastcore.train's --help).

On several machines, run `python -m fastcore.train <args> --strategy multi-worker` on each with a
TF_CONFIG naming every worker's host:port and its own index (README shows one).
Imports no TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

STOP_TIMEOUT = 10.0


def parser() -> argparse.ArgumentParser:
    from fastcore.cli.args import OneLineParser
    p = OneLineParser(prog="fastcore-launch", description="Start N local workers of one multi-worker fastcore run "
                      "(tf.distribute.MultiWorkerMirroredStrategy over loopback) and return the chief's exit code.",
                      epilog="example: python -m fastcore.launch --workers 2 -- --dataset higgs --data-dir ../shared/data "
                      "--verify 20")
    p.add_argument("--workers", type=int, required=True, metavar="N", help="number of worker processes (>= 1)")
    p.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT, metavar="S",
                   help="after a worker fails (or a SIGINT/SIGTERM here), seconds the others get to end by "
                   "themselves, then as long again after SIGTERM before SIGKILL (default: %(default)s)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_ARGS",
                   help="arguments for python -m fastcore.train, after --")
    return p


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (held open together, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL if the launcher itself is killed (no orphan holding a port)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stream(pipe, prefix: str, sink) -> None:
    for line in iter(pipe.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()
    pipe.close()


class Workers:
    """The worker processes, each in its own process group (so stopping one stops its children too)."""

    def __init__(self, count: int, train_args: list[str]):
        ports = free_ports(count)
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        command = [sys.executable, "-m", "fastcore.train", *train_args]
        if "--strategy" not in train_args:
            command += ["--strategy", "multi-worker"]
        for index in range(count):
            env = {**os.environ, "TF_CONFIG": tf_config(ports, index)}
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
            self.procs.append(proc)
            for pipe, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                thread = threading.Thread(target=_stream, args=(pipe, f"[worker {index}] ", sink), daemon=True)
                thread.start()
                self.threads.append(thread)

    def first_failure(self) -> tuple[int, int] | None:
        for index, proc in enumerate(self.procs):
            code = proc.poll()
            if code not in (None, 0):
                return index, code
        return None

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self, timeout: float, forward: int | None = None) -> None:
        """Stop every worker still running, bounded: a signal the launcher received is forwarded at once (the
        workers checkpoint and stop); after a worker's failure the others first get `timeout` seconds to end
        by themselves (a peer's loss reaches them within about a second; they exit with their own line and
        code). Then SIGTERM, and SIGKILL `timeout` seconds later."""
        signals = [forward, signal.SIGKILL] if forward else [None, signal.SIGTERM, signal.SIGKILL]
        for sig in signals:
            if sig is not None:
                for proc in self.procs:
                    if proc.poll() is None:
                        try:
                            os.killpg(proc.pid, sig)
                        except ProcessLookupError:
                            pass
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.running():
                break
        for proc in self.procs:
            proc.wait()
        for thread in self.threads:
            thread.join(timeout=2)


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return e.code
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.workers < 1:
        print(f"fastcore-launch: error: --workers {args.workers} must be at least 1", file=sys.stderr)
        return 2
    if not train_args:
        print("fastcore-launch: error: no training arguments: give them after --, e.g. -- --dataset higgs",
              file=sys.stderr)
        return 2
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    workers = Workers(args.workers, train_args)
    while workers.running():
        failure = workers.first_failure()
        if failure or received:
            if failure:
                why = f"worker {failure[0]} ended with {describe(failure[1])}"
                plan = f"the others get {args.stop_timeout:g} s to end, then SIGTERM, then SIGKILL"
            else:
                why = f"{signal.Signals(received[0]).name} received"
                plan = f"forwarded to the workers; SIGKILL after {args.stop_timeout:g} s"
            if workers.running():
                print(f"fastcore-launch: {why}; {plan}", file=sys.stderr, flush=True)
            workers.stop(args.stop_timeout, forward=None if failure else received[0])
            break
        time.sleep(0.1)
    workers.stop(args.stop_timeout)
    codes = [p.returncode for p in workers.procs]
    chief = codes[0]
    if any(codes):
        print("fastcore-launch: " + ", ".join(f"worker {i} {describe(c)}" for i, c in enumerate(codes)),
              file=sys.stderr, flush=True)
    return chief if chief >= 0 else 128 - chief


if __name__ == "__main__":
    sys.exit(main())
