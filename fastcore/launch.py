"""`python -m fastcore.launch --workers N -- <train args>`: N local workers of one multi-worker run.

Each worker is `python -m fastcore.train <train args> --strategy multi-worker` with its own TF_CONFIG
naming N free loopback ports; worker 0 is the chief (it writes the run's files). Output is streamed with
a `[worker i]` prefix. When a worker fails, the others are stopped (SIGTERM, then SIGKILL after
--stop-timeout seconds: a worker waiting for a peer inside TensorFlow ignores SIGTERM), so nothing is
left running and nothing hangs. The workers' temp directory (TMPDIR) is one private folder the launcher
removes at the end, however they ended. The exit code is the chief's (see fastcore.train's --help). A worker that
ends by a signal is named in one line with its cause: what the signal means, who sent it, and the last
telling line of its stderr (e.g. "Resource temporarily unavailable": a limit on threads was reached).

TensorFlow's server listens on every interface whatever TF_CONFIG says, so by default (--network private)
the launcher first moves itself into a private network namespace (fastcore.netns) that every worker
inherits: their only interface is its loopback, so no one outside reaches their servers, and they have no
network access. With --network host, or when the kernel refuses the namespace, the workers share the host's
network and each server gets a loopback-only socket filter (fastcore.serverguard) where the kernel allows
it (recent kernels: only with CAP_NET_ADMIN); one line says which protection is in force.

On several machines, run `python -m fastcore.train <args> --strategy multi-worker` on each with a
TF_CONFIG naming every worker's host:port and its own index (README shows one).
Imports no TensorFlow.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from fastcore import netns, serverguard

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
    p.add_argument("--network", choices=("private", "host"), default="private",
                   help="private: the workers run in a network namespace of their own whose only interface is its "
                   "loopback, so nothing outside it can reach their (unauthenticated) TensorFlow servers; they have "
                   "NO network access: download tfds data beforehand or give --data-dir. host: the machine's network "
                   "(e.g. for workers that download), their servers kept to loopback connections by a socket "
                   "filter where the kernel allows it (recent kernels: root or CAP_NET_ADMIN only); also used, "
                   "with one line saying why, when the kernel refuses a private namespace (default: %(default)s)")
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


def isolate(network: str) -> str:
    """Move this launcher, so every worker it will start, into a private network when asked and allowed (before
    any worker or port exists; the launcher is still single-threaded, as a user namespace needs). The line
    saying which protection the workers' servers have."""
    if network == "host":
        network = "the host's (--network host)"
    else:
        refused = netns.private_loopback()
        if not refused:
            return ("network: private (the workers' only interface is their own loopback: nothing outside reaches "
                    "their servers; they have no network access)")
        network = f"the host's, a private one was refused ({refused})"
    unfiltered = serverguard.refusal()
    if unfiltered:
        return f"network: {network}; their servers are OPEN to every interface: {unfiltered}"
    return f"network: {network}; their servers accept connections from loopback addresses only (a socket filter)"


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL if the launcher itself is killed (no orphan holding a port)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stream(pipe, prefix: str, sink, tail: collections.deque | None = None) -> None:
    for line in iter(pipe.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()
        if tail is not None and line.strip():
            tail.append(line.strip())
    pipe.close()


class Workers:
    """The worker processes, each in its own process group (so stopping one stops its children too)."""

    def __init__(self, count: int, train_args: list[str], scratch: str):
        ports = free_ports(count)
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.tails = [collections.deque(maxlen=40) for _ in range(count)]   # each worker's last stderr lines
        self.sent: dict[int, int] = {}   # worker index -> the last signal the launcher sent it
        command = [sys.executable, "-m", "fastcore.train", *train_args]
        if "--strategy" not in train_args:
            command += ["--strategy", "multi-worker"]
        for index in range(count):
            env = {**os.environ, "TF_CONFIG": tf_config(ports, index), "TMPDIR": scratch}
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
            self.procs.append(proc)
            for pipe, sink, tail in ((proc.stdout, sys.stdout, None), (proc.stderr, sys.stderr, self.tails[index])):
                thread = threading.Thread(target=_stream, args=(pipe, f"[worker {index}] ", sink, tail), daemon=True)
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
                for index, proc in enumerate(self.procs):
                    if proc.poll() is None:
                        try:
                            os.killpg(proc.pid, sig)
                            self.sent[index] = sig
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


MEANINGS = {
    "SIGABRT": "an abort (a fatal error in native code)",
    "SIGSEGV": "it crashed (invalid memory access)",
    "SIGBUS": "it crashed (bus error: a truncated memory-mapped file, or /dev/shm full)",
    "SIGILL": "it crashed (illegal instruction: a build for another CPU?)",
    "SIGFPE": "it crashed (arithmetic fault)",
    "SIGKILL": "killed from outside: the kernel's out-of-memory killer (see dmesg) or another process",
}
LIMITS = {   # what the last lines of a worker's stderr say -> the limit it reached
    "Resource temporarily unavailable": "a limit on threads or processes was reached (ulimit -u, the cgroup's "
                                        "pids.max, /proc/sys/kernel/threads-max)",
    "Too many open files": "the open-files limit was reached (ulimit -n)",
    "Cannot allocate memory": "out of memory",
    "bad_alloc": "out of memory",
    "No space left on device": "the disk is full",
}
_NOISE = ("@ ", "PC: @", "*** ", "[")   # frames and headers of TensorFlow's crash dump


def cause(tail) -> str | None:
    """The line of a worker's last stderr lines that says why it died (a C++ `what():` with the line before
    it, a fatal log line, or the last line that is not part of a stack dump)."""
    lines = list(tail)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("what():"):
            before = lines[i - 1] if i and lines[i - 1].startswith("terminate called") else ""
            return " ".join(f"{before} {lines[i]}".split())
    for line in reversed(lines):
        if line.startswith("F0") or "Check failed" in line:
            return line
    told = [line for line in lines if not line.startswith(_NOISE) and not re.match(r"[IW]\d{4} ", line)]
    return told[-1] if told else None


def describe(code: int, tail=(), sent: int | None = None) -> str:
    """How a worker ended, in words: exit code, or the signal, who sent it and what it means."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    if sent == -code:
        return f"stopped by the launcher ({name})"
    said = cause(tail)
    why = next((limit for text, limit in LIMITS.items() if said and text in said), None)
    meaning = MEANINGS.get(name, "a signal from outside")
    return (f"killed by {name}: {meaning}" + (f": {why}" if why else "") +
            (f" (its last words: {said[:160]!r})" if said else ""))


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
    try:
        print(f"fastcore-launch: {isolate(args.network)}", file=sys.stderr, flush=True)
    except netns.Stranded as e:
        print(f"fastcore-launch: error: {e}", file=sys.stderr)
        return 2
    # The workers' temp directory: removed below however they end (a worker killed by a signal cannot clean up).
    scratch = tempfile.mkdtemp(prefix="fastcore-launch-")
    try:
        return _run(args, train_args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args, train_args: list[str], scratch: str) -> int:
    """Start the workers, stop them all when one fails or a signal comes, say how each ended."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    workers = Workers(args.workers, train_args, scratch)
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
        ended = [f"worker {i} {describe(c, workers.tails[i], workers.sent.get(i))}" for i, c in enumerate(codes)]
        print("fastcore-launch: " + "; ".join(ended), file=sys.stderr, flush=True)
    return chief if chief >= 0 else 128 - chief


if __name__ == "__main__":
    sys.exit(main())
