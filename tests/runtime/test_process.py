"""runtime.process against the real kernel: containers as real processes in real namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from runtime import namespaces, process
from runtime.errors import BadSpec
from runtime.process import ProcessSpec

from .conftest import Containers


def run_to_exit(containers: Containers, reaper: process.Reaper, spec: ProcessSpec) -> tuple[int | None, str]:
    """Spawn, wait for the exit, and return (exit code, the log's content)."""
    handle = containers.spawn(spec)
    code = reaper.wait(handle.pid, timeout=10)
    return code, Path(spec.log_path).read_text()


def netns_id(path: str) -> str:
    return f"net:[{os.stat(path).st_ino}]"


def pids_in_netns(path: str) -> list[int]:
    """Every process whose network namespace is the one pinned at `path`."""
    wanted, found = netns_id(path), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == wanted:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def add_veth_pair(netns: str) -> None:
    """Two interfaces inside the container's namespace (nothing on the host side)."""
    subprocess.run(["nsenter", f"--net={netns}", "ip", "link", "add", "c0", "type", "veth", "peer", "name", "c1"],
                   check=True)


@pytest.fixture
def etc_files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "hosts").write_text("127.0.0.1\tlocalhost\n10.9.8.7\tweb1\n")
    (tmp_path / "resolv.conf").write_text("nameserver 10.9.8.1\n")
    return {"/etc/hosts": str(tmp_path / "hosts"), "/etc/resolv.conf": str(tmp_path / "resolv.conf")}


def test_container_has_its_own_hostname_files_pid_and_interfaces(
        containers: Containers, reaper: process.Reaper, netns: str, etc_files: dict[str, str]) -> None:
    add_veth_pair(netns)
    script = ("hostname; echo pid=$$; cut -d' ' -f1 /proc/self/stat; cat /etc/hosts /etc/resolv.conf; "
              "echo links: $(ip -o link | cut -d: -f2 | cut -d@ -f1 | sort); "
              "echo sys: $(ls /sys/class/net | sort); ls /proc | grep -c '^[0-9]'")
    code, out = run_to_exit(containers, reaper, ProcessSpec(
        cmd=["sh", "-c", script], netns_path=netns, hostname="web1", etc_files=etc_files,
        log_path=containers.log()))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "web1"
    assert lines[1] == "pid=1"
    assert "10.9.8.7\tweb1" in lines and "nameserver 10.9.8.1" in lines
    assert "links: c0 c1 lo" in lines
    assert "sys: c0 c1 lo" in lines
    assert int(lines[-1]) <= 4  # its own /proc: sh, and the pipeline's children only
    assert os.uname().nodename != "web1"


def test_log_is_appended_and_env_and_workdir_apply(containers: Containers, reaper: process.Reaper) -> None:
    log = containers.log()
    Path(log).write_text("earlier\n")
    code, out = run_to_exit(containers, reaper, ProcessSpec(
        cmd=["sh", "-c", "pwd; echo $GREETING; echo to-stderr >&2; read x || echo stdin-empty"],
        env={"GREETING": "hello"}, workdir="/tmp", log_path=log))
    assert code == 0
    assert out.splitlines() == ["earlier", "/tmp", "hello", "to-stderr", "stdin-empty"]


def test_exit_codes_are_reported(containers: Containers, reaper: process.Reaper) -> None:
    assert run_to_exit(containers, reaper, ProcessSpec(cmd=["true"], log_path=containers.log()))[0] == 0
    assert run_to_exit(containers, reaper, ProcessSpec(cmd=["sh", "-c", "exit 7"], log_path=containers.log()))[0] == 7
    killed = containers.spawn(ProcessSpec(cmd=["sleep", "1000"], log_path=containers.log()))
    assert reaper.wait(killed.pid, 0.05) is None and not reaper.exited(killed.pid)
    os.kill(killed.pid, signal.SIGKILL)  # from outside: PID 1 cannot be killed from within its namespace
    assert reaper.wait(killed.pid, 10) == 128 + signal.SIGKILL
    assert reaper.exited(killed.pid)


def test_on_exit_callback(containers: Containers, reaper: process.Reaper) -> None:
    handle = containers.spawn(ProcessSpec(cmd=["sleep", "0.2"], log_path=containers.log()))
    called = threading.Event()
    results: list[tuple[int, int | None]] = []
    reaper.on_exit(handle.pid, lambda pid, code: (results.append((pid, code)), called.set()))
    assert reaper.exit_code(handle.pid) is None  # still running
    assert called.wait(10)
    assert results == [(handle.pid, 0)]
    late: list[int | None] = []
    reaper.on_exit(handle.pid, lambda pid, code: late.append(code))  # already exited: called at once
    assert late == [0]


def test_stop_kills_a_pid1_that_ignores_sigterm(containers: Containers, reaper: process.Reaper, netns: str) -> None:
    handle = containers.spawn(ProcessSpec(cmd=["sleep", "1000"], netns_path=netns, hostname="sleeper",
                                          log_path=containers.log()))
    assert process.is_running(handle.pid, handle.start_time)
    started = time.monotonic()
    process.stop(handle, timeout=0.3)
    assert time.monotonic() - started < 3
    assert not process.is_running(handle.pid, handle.start_time)
    assert reaper.exit_code(handle.pid) == 137
    assert pids_in_netns(netns) == []
    process.stop(handle)  # already gone: no error


def test_stop_with_sigterm_handler_exits_cleanly(containers: Containers, reaper: process.Reaper) -> None:
    handle = containers.spawn(ProcessSpec(cmd=["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"],
                                          log_path=containers.log()))
    time.sleep(0.2)  # let the shell install its trap
    process.stop(handle, timeout=5)
    assert reaper.exit_code(handle.pid) == 0


def test_kill_is_immediate(containers: Containers, reaper: process.Reaper) -> None:
    handle = containers.spawn(ProcessSpec(cmd=["sleep", "1000"], log_path=containers.log()))
    process.kill(handle)
    assert reaper.exit_code(handle.pid) == 137


def test_is_running_guards_against_pid_reuse(containers: Containers) -> None:
    handle = containers.spawn(ProcessSpec(cmd=["sleep", "1000"], log_path=containers.log()))
    assert process.process_start_time(handle.pid) == handle.start_time
    assert not process.is_running(handle.pid, handle.start_time + 1)
    stale = process.ProcessHandle(handle.pid, handle.start_time + 1)
    process.kill(stale)  # not this process: left alone
    assert process.is_running(handle.pid, handle.start_time)


def test_busybox_rootfs_chroot(containers: Containers, reaper: process.Reaper, netns: str,
                               busybox_rootfs: str, tmp_path: Path) -> None:
    (tmp_path / "hostname").write_text("bb1\n")
    code, out = run_to_exit(containers, reaper, ProcessSpec(
        cmd=["/bin/sh", "-c", "cat /etc/hostname; ls /; echo pid=$$; ls /sys/class/net; ls /dev/null"],
        netns_path=netns, hostname="bb1", rootfs=busybox_rootfs,
        etc_files={"/etc/hostname": str(tmp_path / "hostname")}, log_path=containers.log()))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "bb1"
    assert {"bin", "etc", "proc", "sys", "dev", "tmp"} <= set(lines)
    assert "pid=1" in lines and "lo" in lines and "/dev/null" in lines
    assert "usr" in lines and "lib" not in lines  # busybox's /, not the host's


def mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


@pytest.mark.parametrize("with_rootfs", [False, True])
def test_missing_executable_fails_clearly_and_leaves_nothing(
        containers: Containers, netns: str, busybox_rootfs: str, with_rootfs: bool) -> None:
    mounts_before = mountinfo()
    with pytest.raises(BadSpec, match="executable file not found in \\$PATH: no-such-program"):
        containers.spawn(ProcessSpec(cmd=["no-such-program", "x"], netns_path=netns, hostname="x",
                                     rootfs=busybox_rootfs if with_rootfs else None, log_path=containers.log()))
    assert pids_in_netns(netns) == []
    assert mountinfo() == mounts_before
    with pytest.raises(BadSpec, match="not found: /bin/nope"):
        containers.spawn(ProcessSpec(cmd=["/bin/nope"], log_path=containers.log()))


def test_bad_netns_and_workdir_fail_clearly(containers: Containers, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot join network namespace"):
        containers.spawn(ProcessSpec(cmd=["true"], netns_path=str(tmp_path / "missing"), log_path=containers.log()))
    with pytest.raises(BadSpec, match="working directory /nonexistent"):
        containers.spawn(ProcessSpec(cmd=["true"], workdir="/nonexistent", log_path=containers.log()))
    with pytest.raises(BadSpec, match="invalid hostname"):
        containers.spawn(ProcessSpec(cmd=["true"], hostname="x" * 100, log_path=containers.log()))
    with pytest.raises(BadSpec, match="no command"):
        containers.spawn(ProcessSpec(cmd=[], log_path=containers.log()))


def test_two_containers_share_a_netns(containers: Containers, netns: str) -> None:
    first = containers.spawn(ProcessSpec(cmd=["sleep", "1000"], netns_path=netns, hostname="a",
                                         log_path=containers.log()))
    second = containers.spawn(ProcessSpec(cmd=["sleep", "1000"], netns_path=netns, hostname="b",
                                          log_path=containers.log()))
    for handle in (first, second):
        assert os.readlink(f"/proc/{handle.pid}/ns/net") == netns_id(netns)
    assert os.readlink(f"/proc/{first.pid}/ns/pid") != os.readlink(f"/proc/{second.pid}/ns/pid")
    assert os.readlink(f"/proc/{first.pid}/ns/uts") != os.readlink(f"/proc/{second.pid}/ns/uts")


def test_host_mode_keeps_the_hosts_network_and_name(containers: Containers, reaper: process.Reaper) -> None:
    code, out = run_to_exit(containers, reaper, ProcessSpec(
        cmd=["sh", "-c", "hostname; readlink /proc/1/ns/net; ls /sys/class/net | sort"], log_path=containers.log()))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == os.uname().nodename
    assert lines[1] == os.readlink("/proc/self/ns/net")
    assert lines[2:] == sorted(os.listdir("/sys/class/net"))


def test_container_does_not_pin_other_network_namespaces(
        containers: Containers, reaper: process.Reaper, netns: str, tmp_path: Path) -> None:
    other = str(tmp_path / "other-ns")
    namespaces.create_netns(other)
    try:
        code, out = run_to_exit(containers, reaper, ProcessSpec(
            cmd=["sh", "-c", "grep -c ' - nsfs ' /proc/self/mountinfo || true"], netns_path=netns,
            log_path=containers.log()))
    finally:
        namespaces.delete_netns(other)
    assert out.strip() == "0"


def test_exec_argv_runs_inside_the_container(containers: Containers, netns: str) -> None:
    handle = containers.spawn(ProcessSpec(cmd=["sleep", "1000"], netns_path=netns, hostname="exec1",
                                          workdir="/var", log_path=containers.log()))
    argv = process.exec_argv(handle.pid, ["sh", "-c", "hostname; echo $$; readlink /proc/self/ns/net; pwd"],
                             rootfs=False)
    assert argv[0] == "nsenter"
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout.splitlines()
    assert out[0] == "exec1"
    assert 1 < int(out[1]) < 10  # a small pid: the container's pid namespace
    assert out[2] == netns_id(netns)
    assert out[3] == "/var"  # the container's working directory


def test_exec_argv_with_rootfs(containers: Containers, netns: str, busybox_rootfs: str) -> None:
    handle = containers.spawn(ProcessSpec(cmd=["/bin/sleep", "1000"], netns_path=netns, hostname="exec2",
                                          rootfs=busybox_rootfs, workdir="/tmp", log_path=containers.log()))
    argv = process.exec_argv(handle.pid, ["/bin/sh", "-c", "pwd; hostname; ls /"], rootfs=True)
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout.splitlines()
    assert out[:2] == ["/tmp", "exec2"]
    assert "usr" in out and "lib" not in out


def test_exit_of_a_process_that_is_not_our_child_is_noticed(reaper: process.Reaper) -> None:
    """As after a daemon restart: the container was adopted by someone else. Exit noticed, code unknown."""
    parent = subprocess.Popen(["sh", "-c", "sleep 0.3 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = -1
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        assert not reaper.exited(grandchild)
        assert reaper.wait(grandchild, timeout=10) is None
        assert reaper.exited(grandchild)
        assert parent.wait(timeout=10) == 0  # its status was left to its real parent
    finally:
        parent.kill()
        parent.wait()
        reaper.forget(grandchild)
