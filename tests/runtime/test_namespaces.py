"""runtime.namespaces against the real kernel: pinned network namespaces, entering them per thread."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from runtime import namespaces

REPO = Path(__file__).resolve().parents[2]


def thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def netns_id(path: str) -> str:
    """The namespace a pinned file refers to, as readlink /proc/.../ns/net spells it."""
    return f"net:[{os.stat(path).st_ino}]"


def mounted_at(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def test_created_netns_has_only_lo_and_it_is_up(netns: str) -> None:
    assert namespaces.is_netns(netns)
    assert netns_id(netns) != thread_netns()
    links = subprocess.run(["nsenter", f"--net={netns}", "ip", "-o", "link"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(links) == 1
    assert ": lo: <LOOPBACK,UP" in links[0]


def test_create_twice_raises_file_exists(netns: str) -> None:
    before = netns_id(netns)
    with pytest.raises(FileExistsError):
        namespaces.create_netns(netns)
    assert netns_id(netns) == before


def test_create_makes_parent_dirs_and_reuses_a_stale_file(tmp_path: Path) -> None:
    path = str(tmp_path / "a" / "b" / "ns")
    stale = str(tmp_path / "stale")
    Path(stale).touch()  # as a crash between creating the file and mounting would leave it
    try:
        namespaces.create_netns(path)
        namespaces.create_netns(stale)
        assert namespaces.is_netns(path) and namespaces.is_netns(stale)
    finally:
        namespaces.delete_netns(path)
        namespaces.delete_netns(stale)


def test_is_netns_is_false_for_other_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert not namespaces.is_netns(str(plain))
    assert not namespaces.is_netns(str(tmp_path / "missing"))
    assert not namespaces.is_netns(str(tmp_path))


def test_delete_netns_leaves_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "ns")
    namespaces.create_netns(path)
    try:
        assert mounted_at(path)
    finally:
        namespaces.delete_netns(path)
    assert not os.path.lexists(path)
    assert not mounted_at(path)
    namespaces.delete_netns(path)  # absent: no error


def test_entered_netns_switches_the_thread_and_comes_back(netns: str) -> None:
    outside = thread_netns()
    with namespaces.entered_netns(netns):
        assert thread_netns() == netns_id(netns)
        assert [name for _, name in socket.if_nameindex()] == ["lo"]
    assert thread_netns() == outside


def test_entered_netns_comes_back_on_error(netns: str) -> None:
    outside = thread_netns()
    with pytest.raises(RuntimeError), namespaces.entered_netns(netns):
        raise RuntimeError("boom")
    assert thread_netns() == outside


def test_entered_netns_nests_and_none_is_a_no_op(netns: str, tmp_path: Path) -> None:
    outside = thread_netns()
    other = str(tmp_path / "other")
    namespaces.create_netns(other)
    try:
        with namespaces.entered_netns(netns):
            with namespaces.entered_netns(other):
                assert thread_netns() == netns_id(other)
            assert thread_netns() == netns_id(netns)
            with namespaces.entered_netns(None):
                assert thread_netns() == netns_id(netns)
        assert thread_netns() == outside
    finally:
        namespaces.delete_netns(other)


def test_entered_netns_is_thread_local(netns: str) -> None:
    outside = thread_netns()
    inside, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def enter_and_hold() -> None:
        with namespaces.entered_netns(netns):
            seen.append(thread_netns())
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=enter_and_hold)
    worker.start()
    try:
        assert inside.wait(5)
        assert thread_netns() == outside
        assert seen == [netns_id(netns)]
    finally:
        release.set()
        worker.join()


def test_entered_netns_of_something_else_fails_clearly(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    outside = thread_netns()
    with pytest.raises(OSError, match="cannot enter network namespace"), namespaces.entered_netns(str(plain)):
        pass
    assert thread_netns() == outside


def test_open_in_netns_makes_a_socket_that_stays_there(netns: str) -> None:
    sock = namespaces.open_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.bind(("127.0.0.1", 0))  # the container's loopback, after we have left the namespace
        port = sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host_side:
            host_side.bind(("127.0.0.1", port))  # free here: a different namespace
    finally:
        sock.close()


def test_create_netns_works_in_a_private_mount_namespace(tmp_path: Path) -> None:
    """As inside a Mininet host: the pin is mounted in that namespace only."""
    path = str(tmp_path / "private-ns")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from runtime import namespaces
        namespaces.create_netns({path!r})
        assert namespaces.is_netns({path!r})
        with namespaces.entered_netns({path!r}):
            import socket
            assert [n for _, n in socket.if_nameindex()] == ["lo"]
        namespaces.delete_netns({path!r})
        assert not os.path.exists({path!r})
        print("ok")
    """)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "ok", result.stderr
    assert not mounted_at(path)
