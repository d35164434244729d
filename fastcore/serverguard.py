"""Only this machine may connect to a local worker's TensorFlow server.

TensorFlow's gRPC server listens on every interface whatever TF_CONFIG names (grpc_server_lib.cc binds
"0.0.0.0:<port>", which gRPC opens as one dual-stack IPv4 + IPv6 socket; TensorFlow 2.21 has no option
for the address) and it is unauthenticated: whoever reaches the port can run ops, e.g. read and write
files as the training user. When every worker is on this machine (python -m fastcore.launch), the
server's listening socket gets a kernel socket filter (SO_ATTACH_FILTER, classic BPF) that drops every
packet whose source is not a loopback address, so a connection from elsewhere never completes its
handshake; accepted connections inherit the filter. The join watchdog attaches it from outside (through
pidfd_getfd) as soon as the socket exists, while TensorFlow's constructor waits for the peers holding the
GIL; after the constructor it is attached again here and any connection from elsewhere made before is
shut. Linux only; the socket table still shows the wildcard address. Recent kernels (6.18 here) attach a
filter to a TCP socket only with CAP_NET_ADMIN: `refusal()` says so beforehand. The launcher relies on it
with --network host, or when its private network (fastcore.netns) is refused; inside that network, whose
only interface is loopback, no filter is needed (`isolated()`).
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import sys

SO_ATTACH_FILTER = 26
PR_SET_PTRACER = 0x59616D61   # Yama: let the watchdog (a child) take a copy of this process's socket
SYS_PIDFD_GETFD = 438
NET = 0xFFF00000              # SKF_NET_OFF: loads relative to the IP header
LISTEN, ESTABLISHED = "0A", "01"


def local_cluster(workers: list[str]) -> bool:
    """Whether every worker address of TF_CONFIG is a loopback address (the launcher's cluster)."""
    for address in workers:
        host = address.rpartition(":")[0].strip("[]")
        if host != "localhost":
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    return False
            except ValueError:
                return False
    return True


def _program() -> list[tuple[int, int, int, int]]:
    """Accept IPv4 from 127.0.0.0/8 and IPv6 from ::1; drop the rest (return 0)."""
    ldb, ld, andk, jeq, ret = 0x30, 0x20, 0x54, 0x15, 0x06
    code = [(ldb, 0, 0, NET), (andk, 0, 0, 0xF0), (jeq, 0, "v6", 0x40),
            (ld, 0, 0, NET + 12), (andk, 0, 0, 0xFF000000), (jeq, "accept", "drop", 0x7F000000),
            "v6", (jeq, 0, "drop", 0x60)]
    for offset, word in ((8, 0), (12, 0), (16, 0), (20, 1)):   # the source address, word by word
        code += [(ld, 0, 0, NET + offset), (jeq, "accept" if word else 0, "drop", word)]
    code += ["drop", (ret, 0, 0, 0), "accept", (ret, 0, 0, 0xFFFFFFFF)]
    labels, index = {}, 0
    for item in code:
        if isinstance(item, str):
            labels[item] = index
        else:
            index += 1
    out = []
    for item in code:
        if not isinstance(item, str):
            op, jt, jf, k = item
            at = len(out)
            out.append((op, *(labels[j] - at - 1 if isinstance(j, str) else j for j in (jt, jf)), k))
    return out


_CODE = b"".join(struct.pack("HBBI", *i) for i in _program())
_BUFFER = ctypes.create_string_buffer(_CODE, len(_CODE))
FILTER = struct.pack("HL", len(_CODE) // 8, ctypes.addressof(_BUFFER))   # struct sock_fprog


def refusal() -> str | None:
    """Why this process could not attach the filter to a TCP socket, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, FILTER)
    except OSError as e:
        return (f"the kernel refused the loopback-only socket filter ({e.strerror or e}: recent kernels require "
                "CAP_NET_ADMIN for it)")
    return None


def interfaces(pid: int | str = "self") -> list[str] | None:
    """The network interfaces of `pid`'s network namespace (None: unknown, e.g. not Linux)."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            return [row.split(":")[0].strip() for row in f.read().splitlines()[2:]]
    except OSError:
        return None


def isolated() -> bool:
    """Whether this process's network namespace has no interface but loopback: a wildcard server there is
    reachable from nowhere else."""
    return interfaces() == ["lo"]


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6}: 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def sockets(pid: int, port: int) -> list[tuple[int, str, object, object]]:
    """(fd, state, local address, remote address) of `pid`'s TCP sockets on local `port`."""
    inodes = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[target[8:-1]] = int(fd)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode in inodes and int(local.rpartition(":")[2], 16) == port:
                found.append((inodes[inode], state, _address(local.rpartition(":")[0]),
                              _address(remote.rpartition(":")[0])))
    return found


def _copy_of(pid: int, fd: int) -> int:
    """A descriptor here for `pid`'s descriptor `fd` (the same socket)."""
    if pid == os.getpid():
        return os.dup(fd)
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return copy
    finally:
        os.close(pidfd)


def guard(pid: int, port: int) -> int:
    """Attach the loopback-only filter to each of `pid`'s listening sockets on `port`; how many."""
    done = 0
    try:
        listening = [fd for fd, state, local, _ in sockets(pid, port) if state == LISTEN and not _loopback(local)]
        for fd in listening:
            with socket.socket(fileno=_copy_of(pid, fd)) as s:
                s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, FILTER)
            done += 1
    except OSError:
        pass
    return done


def secure(port: int) -> str | None:
    """In the worker, after TensorFlow's server started: guard it and shut any connection from elsewhere.
    Returns a one-line note when the server could not be guarded."""
    try:
        found = sockets(os.getpid(), port)
    except OSError as e:
        return f"this worker's TensorFlow server on port {port} is open to every interface ({e.strerror or e})"
    if any(state == LISTEN and not _loopback(local) for _, state, local, _ in found) and not guard(os.getpid(), port):
        return f"this worker's TensorFlow server on port {port} could not be restricted to this machine"
    for fd, state, _, remote in found:
        if state == ESTABLISHED and not _loopback(remote):
            with socket.socket(fileno=os.dup(fd)) as s:
                s.shutdown(socket.SHUT_RDWR)
    return None


def allow_inspection_by(pid: int) -> None:
    """Under Yama's ptrace scope 1 a child may not copy its parent's descriptors unless the parent says so."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PTRACER, pid, 0, 0, 0)
    except (OSError, AttributeError):
        pass
