"""Linux namespaces through libc: setns, unshare, mount, and pinned network namespaces.

Python 3.11 has neither os.setns nor os.unshare, so these are thin ctypes wrappers.

This module imports only the standard library (no netd, no relative imports): the
container entry helper (runtime/enter.py) loads it by file path in an isolated
interpreter (`python3 -I -S`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

MNT_DETACH = 0x2

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): which kind of namespace an nsfs file is

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def setns(fd: int, nstype: int = 0) -> None:
    """Move the calling thread into the namespace that `fd` refers to."""
    _check(_libc.setns(fd, nstype), f"setns(fd {fd}, type {nstype:#x})")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {source} on {target} (type {fstype}, flags {flags:#x})")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


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
