"""The distributed runner under trust: who may reach a worker's TensorFlow server (its private network; with
--network host, or a private network refused, the socket table, IPv4 and IPv6, while a run is up), a long
2-worker run with flat threads and descriptors (the soak), a stuck or crashed worker named in one line, the
non-chief worker's private checkpoint folder, and stale `ckpt-N_temp` folders. Every run is a real `python -m fastcore.launch` subprocess, bounded by a timeout."""
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from fastcore import launch, serverguard
from fastcore.engine import runguard

SOAK_STEPS = 3000   # batch 10 of the line task's 1,000 rows: 100 steps an epoch, one compiled call a step


RUNNING: list = []   # launchers started by a test; whatever one leaves running is killed after it


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Run:
    """A launcher subprocess whose output is read as it comes; `workers` are its children."""

    def __init__(self, data_dir, logdir, *args, env=None, launcher=(), entry=("-m", "fastcore.launch")):
        command = [sys.executable, *entry, "--workers", "2", *launcher, "--", "--precision", "float32",
                   "--no-preflight", "--threads", "all", *args, "--data-dir", data_dir, "--logdir", str(logdir)]
        self.proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        RUNNING.append(self.proc)
        self.out, self.err, self.step = [], [], 0
        for pipe, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(pipe, sink), daemon=True).start()

    def _read(self, pipe, sink):
        for line in pipe:
            sink.append(line.rstrip("\n"))
            found = re.search(r"\[worker 0\] Epoch (\d+)/\d+\s+(\d+)/(\d+)", line)   # Epoch N/M  n/per-epoch
            if found:
                epoch, done, per_epoch = map(int, found.groups())
                self.step = (epoch - 1) * per_epoch + done

    def workers(self):
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return [int(p) for p in f.read().split()]

    def wait_for_step(self, step, timeout=120):
        deadline = time.time() + timeout
        while self.step < step:
            assert self.proc.poll() is None and time.time() < deadline, ("\n".join(self.out[-5:]), self.err[-10:])
            time.sleep(0.05)

    def wait_for(self, text, timeout=120):
        deadline = time.time() + timeout
        while not any(text in line for line in self.err):
            assert self.proc.poll() is None and time.time() < deadline, self.err[-10:]
            time.sleep(0.05)

    def finish(self, timeout=120):
        self.proc.wait(timeout=timeout)
        time.sleep(0.2)   # the reader threads drain the pipes
        return self.proc.returncode, [line for line in self.err if line.strip()]


def usage(pid):
    """(threads, open descriptors, RSS MB) of a process."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return threads, len(os.listdir(f"/proc/{pid}/fd")), rss


@pytest.fixture(scope="module")
def soak(data_dir, tmp_path_factory):
    """A 2-worker line run of SOAK_STEPS steps with a checkpoint every 100, its temp directory its own; a
    thread samples each worker's threads, descriptors and RSS, and the worker checkpoint folders, every 0.2 s."""
    tmp = tmp_path_factory.mktemp("soak")
    (tmp / "tmp").mkdir()
    run = Run(data_dir, tmp / "logs", "--dataset", "line", "--batch-size", "10", "--steps-per-call", "1", "--epochs",
              str(SOAK_STEPS // 100), "--checkpoint-every", "100", "--run-name", "r", env={"TMPDIR": str(tmp / "tmp")})
    run.tmp, run.samples, run.folders = tmp / "tmp", [], []
    RUNNING.remove(run.proc)   # the soak outlives each test that reads it: this fixture ends it

    def sample():
        while run.proc.poll() is None:
            try:
                if run.step:
                    run.samples.append((run.step, [usage(pid) for pid in run.workers()]))
                    folders = list(run.tmp.glob("fastcore-launch-*/fastcore-worker-checkpoint-*"))
                    run.folders.append((run.step, [(p.name, p.lstat().st_ino, oct(p.lstat().st_mode))
                                                   for p in folders]))
            except (OSError, ValueError, AttributeError):   # a worker ending between two reads
                pass
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def listening(pid):
    """(address, port) of every listening TCP socket `pid` holds, read from the socket table (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    address, port = fields[1].split(":")
                    raw = bytes.fromhex(address)
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # host-order words
                    found.append((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def external_addresses():
    """This machine's non-loopback addresses (one IPv4, one global IPv6, where it has them)."""
    found = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))   # no packet is sent: this only picks the source address
            found.append(s.getsockname()[0])
    except OSError:
        pass
    with open("/proc/net/if_inet6") as f:
        for row in f.read().splitlines():
            fields = row.split()
            if fields[3] == "00" and fields[5] != "lo":   # global scope
                found.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0])))
                break
    return [a for a in found if not a.startswith("127.")]


def reaches(address, port, timeout=1.5):
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def test_worker_servers_are_in_a_private_network_while_a_run_is_up(soak):
    """TensorFlow 2.21 binds its gRPC server to the wildcard address whatever TF_CONFIG says; the launcher runs
    both workers in one network namespace of their own whose only interface is its loopback, so from here (the
    machine's namespace) nothing listens on the worker's port: not on this machine's external IPv4 and IPv6
    addresses, nor on 127.0.0.1 and ::1. (The run completing is the next test's.)"""
    soak.wait_for_step(200)
    assert soak.err[0].startswith("fastcore-launch: network: private"), soak.err[:3]
    externals = external_addresses()
    assert externals, "this test needs a non-loopback address to connect from"
    ours = os.readlink("/proc/self/ns/net")
    spaces = set()
    for pid in soak.workers():
        spaces.add(os.readlink(f"/proc/{pid}/ns/net"))
        assert serverguard.interfaces(pid) == ["lo"], (pid, serverguard.interfaces(pid))
        sockets = listening(pid)   # the worker's own namespace's socket table
        assert sockets, f"worker {pid} has no listening socket"
        for address, port in sockets:
            for outside in ["127.0.0.1", "::1", *externals]:
                assert not reaches(outside, port), f"worker {pid}'s server {address}:{port} answered {outside}"
    assert len(spaces) == 1 and ours not in spaces, (ours, spaces)   # one namespace, shared, not ours


def test_a_long_two_worker_run_holds_threads_and_descriptors_flat(soak):
    code, err = soak.finish(timeout=300)
    assert code == 0, err[-10:]
    assert soak.step >= SOAK_STEPS and not any("Traceback" in line for line in err), err[-10:]
    late = [s for s in soak.samples if s[0] >= 200]   # after the first calls (tracing, the first checkpoint)
    assert len(late) >= 20, len(late)
    for worker in range(2):
        threads = [workers[worker][0] for _, workers in late if len(workers) == 2]
        fds = [workers[worker][1] for _, workers in late if len(workers) == 2]
        rss = [workers[worker][2] for _, workers in late if len(workers) == 2]
        assert max(threads) - min(threads) <= 12, (worker, min(threads), max(threads))   # was +7,000 per 1,000 steps
        assert max(fds) - min(fds) <= 4, (worker, min(fds), max(fds))
        assert max(rss) - rss[0] < 100, (worker, rss[0], max(rss))                       # MB; was +80 per 1,000


def test_the_non_chief_worker_saves_into_one_private_folder_kept_for_the_run(soak):
    """Worker 1's checkpoint folder is created once (mkdtemp: mode 0700, a random name, inside the launcher's
    private TMPDIR for the workers), is the same folder at every sample across ~30 saves (never removed and
    re-created at a known path, where a planted symlink received the checkpoints), and is gone at the end."""
    code, _ = soak.finish(timeout=300)
    assert code == 0
    during = [entries for step, entries in soak.folders if 100 < step < SOAK_STEPS]   # from the first save on
    assert len(during) >= 20 and all(entries == during[0] for entries in during), {tuple(e) for e in during}
    ((name, _, mode),) = during[0]   # one folder, the same inode throughout, never missing
    assert mode == "0o40700", mode   # a directory (not a symlink), private to the user
    assert len(list((soak.tmp.parent / "logs" / "r" / "checkpoints").glob("ckpt-*.index"))) == 3
    assert list(soak.tmp.iterdir()) == []   # the worker's folder, and the launcher's TMPDIR for the workers, removed


def refused_launch():
    """`python -c <this> ARGS`: the launcher whose unshare(2) fails with EPERM (a kernel refusing namespaces)."""
    return ("import ctypes, errno, sys\n"
            "from fastcore import launch, netns\n"
            "class Refusing:\n"
            "    def unshare(self, flags):\n"
            "        ctypes.set_errno(errno.EPERM)\n"
            "        return -1\n"
            "netns._libc = Refusing()\n"
            "sys.exit(launch.main(sys.argv[1:]))\n")


@pytest.mark.parametrize("how", ["network host", "private refused"])
def test_worker_servers_on_the_host_network_answer_only_this_machine(data_dir, tmp_path, how):
    """With --network host, or when the kernel refuses a private network, the workers share this namespace and
    fastcore's kernel filter leaves their wildcard servers reachable from loopback only: a connection from this
    machine's external IPv4 and IPv6 addresses (where an outside attacker's would arrive) never completes. Where
    this kernel refuses the filter itself (recent kernels without CAP_NET_ADMIN), the launcher's line says the
    servers are open, and they are."""
    (tmp_path / "tmp").mkdir()
    host = how == "network host"
    run = Run(data_dir, tmp_path / "logs", "--dataset", "line", "--batch-size", "10", "--steps-per-call", "1",
              "--epochs", "400", launcher=["--network", "host"] if host else [],
              entry=("-m", "fastcore.launch") if host else ("-c", refused_launch()), env={"TMPDIR": str(tmp_path / "tmp")})
    run.wait_for_step(20)
    line = run.err[0]
    assert line.startswith("fastcore-launch: network: the host's" + (" (--network host)" if host else
                           ", a private one was refused (unshare(CLONE_NEWUSER|CLONE_NEWNET): Operation not permitted")), line
    unfiltered = serverguard.refusal()   # this user, on this kernel
    assert line.endswith("loopback addresses only (a socket filter)") != bool(unfiltered), (line, unfiltered)
    externals = external_addresses()
    assert externals, "this test needs a non-loopback address to connect from"
    for pid in run.workers():
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
        sockets = listening(pid)
        assert sockets, f"worker {pid} has no listening socket"
        for address, port in sockets:
            if address in ("127.0.0.1", "::1"):
                continue
            assert address in ("0.0.0.0", "::"), (address, port)
            loopbacks = ["127.0.0.1", "::1"] if address == "::" else ["127.0.0.1"]
            assert all(reaches(a, port) for a in loopbacks), (pid, address, port)   # the workers' own path
            for outside in externals:
                if address == "::" or ":" not in outside:
                    assert reaches(outside, port) == bool(unfiltered), f"{pid}'s {address}:{port} from {outside}"
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 143 and not any("Traceback" in e for e in err), err[-10:]


def test_a_stale_ckpt_temp_folder_is_removed_only_by_the_run_holding_the_lock(data_dir, tmp_path):
    """A save killed by SIGKILL leaves `ckpt-N_temp`; the next run on the folder removes such folders (a
    symlink among them is unlinked, its target untouched); a run refused by the lock removes nothing."""
    folder = tmp_path / "logs" / "r" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "ckpt-7_temp").mkdir()
    (folder / "ckpt-9_temp").mkdir()
    (folder / "ckpt-9_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"half a save")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    (folder / "ckpt-3_temp").symlink_to(outside)
    (folder / "notes_temp").mkdir()   # not a checkpoint's temp folder
    train = [sys.executable, "-m", "fastcore.train", "--dataset", "line", "--epochs", "2", "--precision", "float32",
             "--no-preflight", "--threads", "all", "--run-name", "r", "--logdir", str(tmp_path / "logs"),
             "--data-dir", data_dir]

    with runguard.RunLock(str(tmp_path / "logs" / "r")):
        refused = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert refused.returncode == 2 and "is in use by another run" in refused.stderr, refused.stderr[-500:]
    assert (folder / "ckpt-7_temp").is_dir() and (folder / "ckpt-3_temp").is_symlink()

    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-1000:]
    assert sorted(p.name for p in folder.glob("*_temp*")) == ["notes_temp"]
    assert (outside / "keep.txt").read_text() == "not the run's"
    assert list(folder.glob("ckpt-*.index"))


def test_a_worker_killed_by_a_signal_is_named_in_one_line_with_its_cause(data_dir, tmp_path):
    (tmp_path / "tmp").mkdir()
    # --stop-timeout 30: worker 0 notices the loss by TensorFlow's heartbeat (~10 s) and ends by itself
    run = Run(data_dir, tmp_path / "logs", "--dataset", "line", "--batch-size", "10", "--steps-per-call", "1",
              "--epochs", "400", launcher=["--stop-timeout", "30"], env={"TMPDIR": str(tmp_path / "tmp")})
    run.wait_for_step(100)
    chief, other = run.workers()
    os.kill(other, signal.SIGABRT)
    code, err = run.finish()
    assert code == 4, err[-10:]
    assert not list(tmp_path.glob("tmp/*"))   # the killed worker's temp folder went with the launcher's TMPDIR
    last = err[-1]
    assert last.startswith("fastcore-launch: worker 0 exit code 4; worker 1 killed by SIGABRT: an abort (a fatal "
                           "error in native code)"), last
    assert not any("Traceback" in line for line in err), err


def test_the_launcher_names_the_limit_a_worker_died_of():
    """What a worker prints when it runs out of threads (as the per-collective timeouts made it, at ~16,000
    threads), then TensorFlow's crash dump: the launcher's line names the limit and quotes the error."""
    tail = ["[worker 1] epoch 25  steps 2500", "terminate called after throwing an instance of 'std::system_error'",
            "what():  Resource temporarily unavailable", "*** SIGABRT received by PID 4711 (TID 4790) on cpu 1 ***",
            "PC: @     0x7f2f4a29e9fc  (unknown)  pthread_kill", "@     0x7f2f4a24a520  (unknown)  (unknown)"]
    line = launch.describe(-signal.SIGABRT, tail)
    assert line == ("killed by SIGABRT: an abort (a fatal error in native code): a limit on threads or processes was "
                    "reached (ulimit -u, the cgroup's pids.max, /proc/sys/kernel/threads-max) (its last words: "
                    "\"terminate called after throwing an instance of 'std::system_error' what(): Resource "
                    "temporarily unavailable\")"), line
    assert launch.describe(-signal.SIGKILL, []) == ("killed by SIGKILL: killed from outside: the kernel's "
                                                    "out-of-memory killer (see dmesg) or another process")
    assert launch.describe(-signal.SIGTERM, ["x"], sent=signal.SIGTERM) == "stopped by the launcher (SIGTERM)"
    assert launch.describe(3) == "exit code 3"


def _stop_thread(tid):
    """Stop one thread of another process (PTRACE_SEIZE then PTRACE_INTERRUPT stop that thread alone, unlike
    SIGSTOP); returns how to let it go (from this same thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(0x4206, tid, None, None) != 0 or libc.ptrace(0x4207, tid, None, None) != 0:
        pytest.skip(f"ptrace not permitted here ({os.strerror(ctypes.get_errno())})")
    return lambda: libc.ptrace(17, tid, None, None)   # PTRACE_DETACH


def test_a_worker_stuck_but_alive_ends_the_run_within_the_peer_timeout(data_dir, tmp_path):
    """Worker 1's main thread stops (its other threads keep TensorFlow's heartbeat going, so only fastcore's
    stall watch can notice): worker 0 waits idle in a collective and stops within --peer-timeout, exit 4. Worker 1,
    once released, may end first: the launcher's grace for the others (default 10 s) is raised well above the
    chief's own stop, so the chief's line and code are what is tested, not the launcher's SIGTERM."""
    run = Run(data_dir, tmp_path, "--dataset", "line", "--batch-size", "10", "--steps-per-call", "1", "--epochs", "400",
              "--peer-timeout", "8", launcher=["--stop-timeout", "40"])
    run.wait_for_step(100)
    chief, other = run.workers()
    release = _stop_thread(other)
    stopped = time.time()
    try:
        run.wait_for("a worker was lost at step", timeout=60)
        noticed = time.time() - stopped
    finally:
        release()
    code, err = run.finish()
    assert code == 4, err[-10:]
    lost = [line for line in err if "a worker was lost at step" in line]
    assert lost[0].startswith("[worker 0] fastcore-train: stopped: a worker was lost"), lost
    assert "no answer from the other workers for 8 s (--peer-timeout)" in lost[0], lost
    assert 8 <= noticed < 8 + 10, noticed
    assert not any("Traceback" in line for line in err), err
