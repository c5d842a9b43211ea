"""Integration tests: a real daemon per module, in its own "host" namespace (tests.support.hosts)."""

import pytest

from runtime.rootfs import make_busybox_rootfs
from tests.support.cni import CniRuntime
from tests.support.hosts import NetdHost


@pytest.fixture(scope="module")
def host():
    with NetdHost() as netd_host:
        yield netd_host


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory):
    path = tmp_path_factory.mktemp("rootfs") / "busybox"
    make_busybox_rootfs(str(path))
    return str(path)


@pytest.fixture
def rt(host):
    """A CNI runtime of the test host: namespaces to attach, the plugin run as a runtime runs it."""
    runtime = CniRuntime(host)
    try:
        yield runtime
    finally:
        runtime.cleanup()
