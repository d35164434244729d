"""The launcher's private network, in process and without entering one (that would move pytest itself): a kernel
refusing namespaces leaves this process as it was and gives the host network's line with the socket filter; a
namespace entered but not set up is one error line (exit 2); `--network host` never asks for a namespace."""
import ctypes
import errno
import json
import os

import pytest

from fastcore import launch, netns, serverguard


class Libc:
    """unshare(2) answering with a given errno; the flags it was asked for."""

    def __init__(self, error):
        self.error, self.asked = error, []

    def unshare(self, flags):
        self.asked.append(flags)
        if self.error:
            ctypes.set_errno(self.error)
            return -1
        return 0


def filter_line():
    """The end of the launcher's line on the host network: the filter, or why this kernel refuses it."""
    refused = serverguard.refusal()
    return (f"their servers are OPEN to every interface: {refused}" if refused
            else "their servers accept connections from loopback addresses only (a socket filter)")


def test_a_refused_namespace_falls_back_to_the_host_network_and_its_socket_filter(monkeypatch):
    libc = Libc(errno.EPERM)
    monkeypatch.setattr(netns, "_libc", libc)
    ours = os.readlink("/proc/self/ns/net")
    line = launch.isolate("private")
    assert libc.asked == [netns.CLONE_NEWNET, netns.CLONE_NEWUSER | netns.CLONE_NEWNET]   # then with a user ns
    assert line == ("network: the host's, a private one was refused (unshare(CLONE_NEWUSER|CLONE_NEWNET): Operation "
                    f"not permitted: {netns.WHY[errno.EPERM]}); {filter_line()}"), line
    assert os.readlink("/proc/self/ns/net") == ours
    # what each worker then decides (fastcore.distribute): its loopback cluster, on a network with more than
    # loopback, gets the filter
    workers = json.loads(launch.tf_config(launch.free_ports(2), 0))["cluster"]["worker"]
    assert serverguard.local_cluster(workers) and not serverguard.isolated()


def test_a_namespace_limit_is_named(monkeypatch):
    monkeypatch.setattr(netns, "_libc", Libc(errno.ENOSPC))
    reason = netns.private_loopback()
    assert reason.startswith("unshare(CLONE_NEWNET): No space left on device: the namespace limit"), reason


def test_a_namespace_entered_but_not_set_up_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(netns, "_libc", Libc(0))   # "entered" (nothing happens)

    def refused():
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(netns, "_loopback_up", refused)
    with pytest.raises(netns.Stranded, match=r"entered but not set up \(Operation not permitted\); use --network host"):
        netns.private_loopback()
    assert launch.main(["--workers", "2", "--", "--dataset", "line"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["fastcore-launch: error: the private network was entered but not set up (Operation not "
                   "permitted); use --network host"], err


def test_network_host_asks_for_no_namespace(monkeypatch):
    libc = Libc(0)
    monkeypatch.setattr(netns, "_libc", libc)
    assert launch.isolate("host") == f"network: the host's (--network host); {filter_line()}"
    assert libc.asked == []


def test_help_says_the_private_network_has_no_network_access(capsys):
    assert launch.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--network {private,host}" in text and "NO network access: download tfds data beforehand" in text
