"""A private network for this process and every process it starts: a new network namespace whose only
interface is its own loopback.

TensorFlow's gRPC server binds every interface whatever TF_CONFIG says (fastcore.serverguard); in such a
namespace "every interface" is that loopback alone, so no other namespace (another machine, or this
machine's own addresses and 127.0.0.1) can even see the port. The processes inside have no network access.
Without CAP_SYS_ADMIN the namespace needs a user namespace first, mapping only this uid and gid to
themselves (files keep their real owner; the workers have no capabilities outside it); the kernel allows
that only to a single-threaded process. Linux only; no `ip` binary (the loopback is brought up by ioctl).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sH22x"   # struct ifreq: the interface name, then ifr_flags (40 bytes)
WHY = {
    errno.EPERM: "this user may not create namespaces here (user namespaces restricted by the kernel, e.g. "
                 "kernel.apparmor_restrict_unprivileged_userns, or by a container's seccomp profile)",
    errno.ENOSPC: "the namespace limit is reached or zero (/proc/sys/user/max_user_namespaces, max_net_namespaces)",
    errno.EINVAL: "the kernel has no network namespaces, or this process has several threads",
    errno.ENOSYS: "the kernel has no unshare",
}
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:   # not a Unix
    _libc = None


class Stranded(RuntimeError):
    """The namespace was entered but could not be made usable: there is no way back to the host's network.
    (Not a FastcoreError: fastcore.errors imports NumPy, whose threads would forbid a user namespace.)"""


def _unshare(flags: int) -> int:
    """0, or the errno of unshare(2)."""
    if getattr(_libc, "unshare", None) is None:
        return errno.ENOSYS
    return 0 if _libc.unshare(flags) == 0 else ctypes.get_errno()


def _write(name: str, text: str) -> None:
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack(IFREQ, fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def private_loopback() -> str | None:
    """Move this process into a new network namespace with its loopback up. None when done; else the one-line
    reason it could not, and nothing changed. Raises Stranded if a step after entering the namespace failed."""
    uid, gid = os.getuid(), os.getgid()
    error = _unshare(CLONE_NEWNET)
    user = error == errno.EPERM   # no CAP_SYS_ADMIN: a user namespace of our own gives it
    if user:
        error = _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    if error:
        flags = "CLONE_NEWUSER|CLONE_NEWNET" if user else "CLONE_NEWNET"
        return f"unshare({flags}): {os.strerror(error)}: {WHY.get(error, 'refused by the kernel')}"
    try:
        if user:
            _write("setgroups", "deny")   # required before an unprivileged gid_map
            _write("uid_map", f"{uid} {uid} 1")
            _write("gid_map", f"{gid} {gid} 1")
        _loopback_up()
    except OSError as e:
        raise Stranded(f"the private network was entered but not set up ({e.strerror or e}); "
                       f"use --network host") from None
    return None
