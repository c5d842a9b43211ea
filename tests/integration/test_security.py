"""Locked down: containers get Docker's default capabilities and no_new_privs (--cap-add, --cap-drop,
--privileged as Docker's); the daemon's files are private."""

from __future__ import annotations

import os
import stat

import pytest

from tests.support.hosts import NetdHost


@pytest.fixture(scope="module")
def host():
    with NetdHost(prefix="netdt") as netd_host:
        yield netd_host


def run(host: NetdHost, name: str, *flags: str, command: str) -> str:
    host.netd("run", "-d", "--name", name, *flags, "sh", "-c", f"{command}; echo rc=$?; sleep 100000")
    for _ in range(100):
        out = host.netd("logs", name)
        if "rc=" in out:
            host.netd("rm", "-f", name)
            return out
        __import__("time").sleep(0.05)
    raise AssertionError(f"{name} wrote nothing: {out!r}")


def test_default_container_cannot_change_its_network_nor_mount(host):
    out = run(host, "capdef", command="ip link add dummy0 type bridge && echo made")
    assert "made" not in out and "rc=0" not in out, out
    out = run(host, "capmnt", command="mount -t tmpfs none /mnt")
    assert "rc=0" not in out, out
    out = run(host, "capnnp", command="grep NoNewPrivs /proc/self/status")
    assert "NoNewPrivs:\t1" in out, out


def test_cap_add_and_privileged_give_it_back(host):
    out = run(host, "capadd", "--cap-add", "NET_ADMIN", command="ip link add qbr0 type bridge && echo made")
    assert "made" in out, out
    out = run(host, "cappriv", "--privileged", command="mount -t tmpfs none /mnt && echo mounted")
    assert "mounted" in out, out


def test_cap_drop_and_unknown_names(host):
    out = run(host, "capdrop", "--cap-drop", "NET_RAW", command="ping -c1 -W1 127.0.0.1")
    assert "rc=0" not in out, out
    message = host.fails("run", "-d", "--cap-add", "NOPE", "sleep", "1")
    assert message == "netd: unknown capability 'NOPE' (e.g. NET_ADMIN, SYS_ADMIN, ALL)"


def test_the_daemons_files_are_private(host):
    assert stat.S_IMODE(os.stat(host.data_dir).st_mode) == 0o700
    for name in ("netd.db", "host-id"):
        path = os.path.join(host.data_dir, name)
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, f"{name} is readable by others"
    host.netd("run", "-d", "--name", "logmode", "sleep", "100000")
    container = host.inspect("logmode")["Id"]
    log = os.path.join(host.data_dir, "containers", container, "container.log")
    assert stat.S_IMODE(os.stat(log).st_mode) & 0o077 == 0
    host.netd("rm", "-f", "logmode")


def test_info_says_who_may_use_the_socket(host):
    info = __import__("json").loads(host.netd("info", "--format", "json"))
    assert info["SocketAccess"].startswith("root"), info
    assert stat.S_IMODE(os.stat(host.socket).st_mode) == 0o660
