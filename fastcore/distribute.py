"""Making a tf.distribute strategy for `Trainer(strategy=...)`: devices, TF_CONFIG, timeouts, the chief.

    fastcore.distribute.use_devices(2)                    # before any TensorFlow op: 2 logical CPUs, or 2 GPUs
    strategy = fastcore.distribute.strategy("mirrored")   # or "multi-worker" (reads TF_CONFIG)
    trainer = fastcore.Trainer(model_factory, keras.optimizers.Adam(1e-3), loss=..., strategy=strategy)

Any tf.distribute.Strategy you make yourself works too; these helpers add the checks a run needs to fail
in one line instead of hanging: a worker whose peer never starts blocks inside TensorFlow's
constructor, holding the GIL and ignoring SIGTERM (measured), so `strategy("multi-worker")` has a
watchdog process print one line and kill it after `peer_timeout` seconds; a peer that dies mid-run is
noticed by TensorFlow's heartbeat (measured ~9 s here), a stuck one by fastcore.stallwatch after the same
bound (collectives carry no timeout of their own: each would hold a sleeping thread that long). When every
worker is on this machine, only this machine may connect to their TensorFlow servers (fastcore.serverguard).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys

from fastcore import serverguard
from fastcore.errors import UsageError
from fastcore.stallwatch import StallWatch

KINDS = ("none", "mirrored", "multi-worker")
PEER_TIMEOUT = 120.0   # seconds to wait for every worker to join, and for a stuck one mid-run
EXIT_PEER_LOST = 4


def _peer_faults() -> tuple:
    import tensorflow as tf
    # What a collective raises when a peer dies (measured: "Collective ops is aborted" within ~1 s) or stops
    # answering (the collective timeout).
    return (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.DeadlineExceededError,
            tf.errors.AbortedError, tf.errors.InternalError)


def __getattr__(name: str):
    if name == "PEER_FAULTS":   # lazily: this module is imported before TensorFlow is needed
        return _peer_faults()
    raise AttributeError(name)


def first_line(e: BaseException) -> str:
    """The line of a TensorFlow error that says what happened, e.g. "Collective ops is aborted by: ... The
    following tasks are unhealthy (stopped sending heartbeats): /job:worker/replica:0/task:1", without
    the "Graph execution error" header and the Python frames TensorFlow puts first."""
    lines = [line.strip() for line in (getattr(e, "message", None) or str(e)).splitlines()]
    said = [line for line in lines if line and not line.startswith(("Graph execution error", "Detected at node", "File ",
                                                                   "[[", "The error could be", "The tasks have"))]
    if not said:
        return type(e).__name__
    text = said[0] + (f" {said[1]}" if said[0].endswith(":") and len(said) > 1 else "")
    return text[:200]


def use_devices(count: int) -> list[str]:
    """Make `count` devices visible for MirroredStrategy: the first `count` GPUs when there are GPUs, else
    the CPU split into `count` logical devices (for testing: they share the CPU's cores). Must run before
    TensorFlow executes any op. Returns the device names."""
    import tensorflow as tf
    if count < 1:
        raise UsageError(f"--devices {count} must be at least 1")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if count > len(gpus):
            raise UsageError(f"--devices {count}: this machine has {len(gpus)} GPU(s)")
        return [f"/gpu:{i}" for i in range(count)]
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UsageError(f"--devices {count}: TensorFlow already started with "
                             f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); call "
                             f"fastcore.distribute.use_devices before any TensorFlow op") from None
    return [f"/cpu:{i}" for i in range(count)]


def cluster() -> dict:
    """TF_CONFIG, checked: a cluster of `worker` addresses and this process's task index among them."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UsageError("--strategy multi-worker needs TF_CONFIG (the cluster's worker addresses and this worker's "
                         "index): start the workers with python -m fastcore.launch, or set it as README shows")
    try:
        config = json.loads(raw)
        workers = list(config["cluster"]["worker"])
        index = int(config["task"]["index"])
        kind = config["task"].get("type", "worker")
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"TF_CONFIG is not a cluster spec ({type(e).__name__}: {e}): expected "
                         '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}') from None
    if kind != "worker" or not 0 <= index < len(workers):
        raise UsageError(f"TF_CONFIG task {kind!r} index {index}: must be a worker index below {len(workers)}")
    return {"workers": workers, "index": index}


def check_port_free(address: str) -> None:
    """This worker's own host:port must be free to listen on (else TensorFlow aborts the process)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host.strip("[]") if host not in ("", "localhost") else "127.0.0.1", int(port)))
    except OSError as e:
        raise UsageError(f"this worker's address {address} (TF_CONFIG) cannot be listened on: {e.strerror or e}; "
                         f"is another process using port {port}?") from None
    except ValueError:
        raise UsageError(f"TF_CONFIG address {address!r} is not host:port") from None


def strategy(kind: str, devices: int | None = None, peer_timeout: float = PEER_TIMEOUT):
    """A strategy by name: "none" (None: one device), "mirrored" (all visible GPUs, or `devices` of
    them / of the CPU split by use_devices), "multi-worker" (the workers of TF_CONFIG)."""
    if kind not in KINDS:
        raise UsageError(f"unknown strategy {kind!r}: choose one of {', '.join(KINDS)}")
    if not (math.isfinite(peer_timeout) and peer_timeout > 0):
        raise UsageError(f"--peer-timeout {peer_timeout} must be a positive number of seconds")
    if kind == "none":
        if devices not in (None, 1):
            raise UsageError(f"--devices {devices} needs --strategy mirrored (one device is used without one)")
        return None
    import tensorflow as tf
    if kind == "mirrored":
        names = use_devices(devices) if devices is not None else _all_devices()
        if len(names) < 2 and devices is None:
            raise UsageError("--strategy mirrored: this machine has one device (no GPU); give --devices N to split "
                             "the CPU into N logical devices (for testing: they share the cores)")
        return tf.distribute.MirroredStrategy(names)
    spec = cluster()
    address = spec["workers"][spec["index"]]
    check_port_free(address)
    if devices is not None:
        use_devices(devices)
    # Only when every worker is here: a multi-host cluster's peers connect from addresses this cannot know;
    # and not in a namespace with loopback alone (the launcher's private network), where none is needed.
    guarded = serverguard.local_cluster(spec["workers"]) and not serverguard.isolated()
    port = int(address.rpartition(":")[2]) if guarded else 0
    with _deadline(peer_timeout, f"not every worker of TF_CONFIG ({', '.join(spec['workers'])}) joined within "
                                 f"{peer_timeout:g} s", guard_port=port):
        made = tf.distribute.MultiWorkerMirroredStrategy()
    if port:
        note = serverguard.secure(port)
        if note:
            print(f"fastcore: warning: {note}", file=sys.stderr, flush=True)
    _WATCHES[id(made)] = StallWatch(peer_timeout)
    return made


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (TensorBoard, summary.json, checkpoints): always
    without a strategy or on one machine; worker 0 of a multi-worker cluster."""
    if strategy is None:
        return True
    return bool(getattr(strategy.extended, "should_checkpoint", True))


_SUMS: dict = {}   # strategy id -> its compiled all-reduce (a strategy lives as long as its process)
_WATCHES: dict = {}   # strategy id -> the StallWatch of its calls


def waiting(strategy):
    """Around a call that holds collectives: a stuck peer ends it within the peer timeout (fastcore.stallwatch).
    A multi-worker strategy made elsewhere gets the default timeout; other strategies need none."""
    if strategy is None or not multi_worker(strategy):
        return contextlib.nullcontext()
    watch = _WATCHES.get(id(strategy))
    if watch is None:
        watch = _WATCHES[id(strategy)] = StallWatch(PEER_TIMEOUT)
    return watch.call()


def replica_sums(strategy, values: list[float]) -> list[float]:
    """Each value summed over every replica of every worker (one all-reduce): how workers agree on a
    decision each made alone (a stop signal, auto's precision). Without other workers: the values x replicas."""
    import tensorflow as tf
    fn = _SUMS.get(id(strategy))
    if fn is None:
        def sum_over_replicas(vector):
            def replica(v):
                return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, v * 1.0)
            return strategy.run(replica, args=(vector,))
        fn = _SUMS[id(strategy)] = tf.function(sum_over_replicas, autograph=False)
    with waiting(strategy):
        total = fn(tf.constant(values, tf.float32))
    return [float(v) for v in strategy.experimental_local_results(total)[0].numpy()]


def multi_worker(strategy) -> bool:
    import tensorflow as tf
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _all_devices() -> list[str]:
    import tensorflow as tf
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]


# A separate process, since TensorFlow's constructor holds the GIL while it waits (measured: a Python
# thread's timer never fired) and ignores SIGTERM: only SIGKILL from outside ends it. Given a port, it
# also guards the worker's server as soon as it listens (fastcore.serverguard), polling every 20 ms.
WATCHDOG = """
import os, select, signal, sys, time
sys.path.insert(0, sys.argv[5])
pid, seconds, message, port = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if port:
    from fastcore import serverguard
deadline = time.monotonic() + seconds
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        sys.stderr.write(message + "\\n")
        sys.stderr.flush()
        os.kill(pid, signal.SIGKILL)
        break
    ready, _, _ = select.select([sys.stdin], [], [], min(left, 0.02) if port else left)
    if ready:
        break
    if port and serverguard.guard(pid, port):
        port = 0
"""


class _deadline:
    """Ends this process with one line when the block has not finished within `seconds` (exit status 137,
    killed: the only way out of TensorFlow's multi-worker constructor, which waits for its peers forever)."""

    def __init__(self, seconds: float, message: str, guard_port: int = 0):
        self.seconds, self.message, self.guard_port = seconds, message, guard_port
        self.watchdog = None

    def __enter__(self):
        import subprocess
        line = (f"fastcore-train: error: {self.message}; is every worker started with the same TF_CONFIG "
                f"cluster? (the timeout is --peer-timeout)")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        argv = [str(os.getpid()), str(self.seconds), line, str(self.guard_port), root]
        self.watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, *argv], stdin=subprocess.PIPE,
                                         stderr=sys.stderr.fileno())
        if self.guard_port:
            serverguard.allow_inspection_by(self.watchdog.pid)
        return self

    def __exit__(self, *exc):
        self.watchdog.stdin.close()   # end of input: the watchdog exits without a word
        self.watchdog.wait()
        return False
