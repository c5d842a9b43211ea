"""Fixtures for the runtime tests: real namespaces and processes, unique per test, always cleaned up."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import namespaces, process
from runtime.rootfs import make_busybox_rootfs

if os.geteuid() != 0:
    pytest.skip("runtime tests need root (namespaces, mounts)", allow_module_level=True)


@pytest.fixture(scope="package")
def reaper() -> Iterator[process.Reaper]:
    """A started Reaper, as in the daemon. It makes this pytest process a child subreaper;
    that is undone after these tests, so that other packages' orphans go to init as usual."""
    existing = process.active_reaper()
    if existing is not None:  # started by someone else in this process: theirs to keep
        yield existing
        return
    started = process.Reaper()
    started.start()
    try:
        yield started
    finally:
        ctypes.CDLL(None).prctl(process.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "netns" / "c1")
    namespaces.create_netns(path)
    try:
        yield path
    finally:
        namespaces.delete_netns(path)


class Containers:
    """spawn() that remembers every handle, so the fixture can kill them all."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.handles: list[process.ProcessHandle] = []

    def spawn(self, spec: process.ProcessSpec) -> process.ProcessHandle:
        handle = process.spawn(spec)
        self.handles.append(handle)
        return handle

    def log(self, name: str = "log") -> str:
        return str(self.tmp_path / name)


@pytest.fixture
def containers(tmp_path: Path, reaper: process.Reaper) -> Iterator[Containers]:
    box = Containers(tmp_path)
    try:
        yield box
    finally:
        for handle in box.handles:
            process.kill(handle)
            reaper.forget(handle.pid)


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("rootfs"))
    make_busybox_rootfs(path)
    return path
