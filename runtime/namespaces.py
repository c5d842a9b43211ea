"""Network namespaces: create them pinned at a path, enter them per thread.

The system calls themselves (and the CLONE_*/MS_* constants, re-exported here)
are in runtime/syscalls.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from .syscalls import (  # noqa: F401  (re-exported: the namespaces API)
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_BIND,
    mount,
    setns,
    umount,
    unshare,
)

T = TypeVar("T")

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs file is


def is_netns(path: str) -> bool:
    """True if `path` is a pinned network namespace (an nsfs file of type net)."""
    try:
        # O_NONBLOCK: never hang on a FIFO someone left at the path.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # ENOTTY: an ordinary file, not a namespace
        return False
    finally:
        os.close(fd)


def _set_loopback_up() -> None:
    """Bring `lo` up in the calling thread's network namespace (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, ifreq))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def create_netns(path: str) -> None:
    """Create a network namespace pinned by a bind mount at `path`, with `lo` up.

    Like `ip netns add`, at any path. The daemon is multi-threaded, so it must not
    fork; instead a short-lived thread unshares CLONE_NEWNET (the network namespace
    is per thread on Linux), bind-mounts its own namespace file onto `path` in the
    process's mount namespace (whichever that is: the host's, or a Mininet host's
    private one), and exits; the mount keeps the namespace alive.
    """
    if is_netns(path):
        raise FileExistsError(errno.EEXIST, f"a network namespace already exists at {path}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    created = False
    try:
        # The mount point; a stale empty file from a crash is simply reused.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        os.close(fd)
        created = True
    except FileExistsError:
        pass

    failure: list[BaseException] = []

    def pin() -> None:
        try:
            unshare(CLONE_NEWNET)
            mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, None, MS_BIND)
            _set_loopback_up()
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=pin, name="netd-create-netns")
    thread.start()
    thread.join()
    if failure:
        if is_netns(path):
            with contextlib.suppress(OSError):
                umount(path, MNT_DETACH)
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise failure[0]


def delete_netns(path: str) -> None:
    """Unpin the network namespace at `path` and remove the file; no error if absent.

    The namespace itself goes when its last user (a process, an open fd) goes.
    """
    while is_netns(path):  # a racing double create could have stacked two mounts
        umount(path, MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def entered_netns(path: str | None) -> Iterator[None]:
    """Run the body with the calling thread (only) in the network namespace at `path`.

    Back in the thread's previous namespace on exit, even on error. `None` is a no-op.
    Cost: two opens and two setns calls, no thread or process.
    """
    if path is None:
        yield
        return
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                setns(target, CLONE_NEWNET)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot enter network namespace {path}: {os.strerror(exc.errno)}") from None
            try:
                yield
            finally:
                # If this failed the thread would silently stay in the container's
                # namespace; raising is the only safe answer.
                setns(original, CLONE_NEWNET)
        finally:
            os.close(original)
    finally:
        os.close(target)


def open_in_netns(path: str | None, factory: Callable[[], T]) -> T:
    """Call `factory()` inside the namespace at `path` and return what it made.

    Sockets (netlink included) stay in the namespace they were created in.
    """
    with entered_netns(path):
        return factory()


def pids_in_netns(paths: list[str]) -> list[int]:
    """Processes whose network namespace is one of `paths` (pinned files or /proc/PID/ns/net).

    Used to clean up after a crash: whatever still runs in a test's or a lab's namespaces.
    """
    inodes = set()
    for path in paths:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(path).st_ino)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.append(int(entry))
    return found
