"""netd as podman's CNI plugin: Debian's podman 4.3 with its CNI backend (network_backend = "cni"),
its own root, runroot and containers.conf, run in a test host's namespace; `netd cni install`
writes the link and the conflist (netd + portmap), as a user would."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.support.cni import (
    NETD,
    REFERENCE_PLUGINS,
    SYSTEM_PATH,
    CniRuntime,
    assert_nothing_left,
    cni_allocations,
    make_network,
    unique,
)
from tests.support.hosts import UPLINK_HOST

pytestmark = pytest.mark.skipif(not os.access(NETD, os.X_OK), reason="needs the installed netd (make install)")


PODMAN = shutil.which("podman")
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


class Podman:
    """A private podman: its own root, runroot, tmpdir and containers.conf (CNI backend, the test's
    config and plugin dirs), run in the test host's namespace as a runtime on that host would be."""

    def __init__(self, host, rt: CniRuntime):
        self.host = host
        self.dir = tempfile.mkdtemp(prefix=f"{host.name}-podman-")
        self.conf_dir = os.path.join(self.dir, "net.d")
        os.makedirs(self.conf_dir)
        self.bin_dir = rt.bin_dir
        conf = os.path.join(self.dir, "containers.conf")
        with open(conf, "w") as f:
            f.write(f"""[network]
network_backend = "cni"
cni_plugin_dirs = ["{rt.bin_dir}", "{REFERENCE_PLUGINS}"]
network_config_dir = "{self.conf_dir}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{self.dir}/events.log"
runtime = "runc"
# conmon starts `podman container cleanup` (which runs the DEL when a container stops) with only
# these variables: it must find this file too
conmon_env_vars = ["PATH={SYSTEM_PATH}", "CONTAINERS_CONF={conf}"]
""")
        self.env = {**os.environ, "CONTAINERS_CONF": conf, "NETD_HOST": f"unix://{host.socket}"}
        self.image = "localhost/netd-cni-busybox:latest"

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        argv = ["nsenter", f"--net=/run/netns/{self.host.name}", PODMAN, "--root", f"{self.dir}/root",
                "--runroot", f"{self.dir}/runroot", "--tmpdir", f"{self.dir}/tmp", "--storage-driver", "vfs",
                "--cgroup-manager", "cgroupfs", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result.stdout.strip()

    def import_busybox(self) -> None:
        from bench.peers import busybox_rootfs_tar
        tar = os.path.join(self.dir, "busybox.tar")
        with open(tar, "wb") as f:
            f.write(busybox_rootfs_tar())
        self("import", tar, self.image)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            ids = self("ps", "-aq", check=False, timeout=30).split()
            if ids:
                self("rm", "-f", "-t", "0", *ids, check=False, timeout=120)
        with contextlib.suppress(Exception):
            self("system", "reset", "-f", check=False, timeout=60)
        subprocess.run(["umount", "-R", f"{self.dir}/root"], capture_output=True)
        subprocess.run(["umount", "-R", f"{self.dir}/runroot"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        # podman (cgroupfs) leaves its conmon cgroup behind: remove it once empty
        for hierarchy in os.listdir("/sys/fs/cgroup"):
            for leftover in ("libpod_parent/conmon", "libpod_parent"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join("/sys/fs/cgroup", hierarchy, leftover))


@pytest.fixture
def podman(host, rt):
    if PODMAN is None:
        pytest.skip("needs podman (apt-get install podman)")
    p = Podman(host, rt)
    try:
        p.import_busybox()
        yield p
    finally:
        p.cleanup()


def podman_netns() -> set[str]:
    return {n for n in os.listdir("/run/netns") if n.startswith("cni-")} if os.path.isdir("/run/netns") else set()


def test_podman_containers_on_a_netd_network(host, podman):
    network, _ = make_network(host)
    # as a user would: the link and the conflist (netd + portmap, the socket from NETD_HOST)
    host.netd("cni", "install", "--bin-dir", podman.bin_dir, "--conf-dir", podman.conf_dir, network)
    before = podman_netns()
    assert network in podman("network", "ls", "--format", "{{.Name}}").split()
    a = podman("run", "-d", *ULIMITS, "--name", unique("pa"), "--network", network, podman.image, "sleep", "1000")
    b = podman("run", "-d", *ULIMITS, "--name", unique("pb"), "--network", network, podman.image, "sleep", "1000")
    web = podman("run", "-d", *ULIMITS, "--name", unique("pw"), "--network", network, "-p", "18090:80", podman.image,
                 "sh", "-c", "mkdir -p /www && echo hello from podman > /www/index.html && httpd -f -p 80 -h /www")
    try:
        ip_a = podman("inspect", a, "--format", f"{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}")
        ip_b = podman("inspect", b, "--format", f"{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}")
        held = {x["Address"] for x in cni_allocations(host, network)}
        assert {ip_a, ip_b} <= held and len(held) == 3
        podman("exec", a, "ping", "-c1", "-W2", ip_b)
        podman("exec", b, "ping", "-c1", "-W2", ip_a)
        deadline = time.monotonic() + 10
        while True:
            answer = host.outside_sh(f"curl -s -m 3 http://{UPLINK_HOST}:18090/", check=False).stdout
            if answer == "hello from podman\n" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert answer == "hello from podman\n"
    finally:
        podman("rm", "-f", "-t", "0", a, b, web, check=False)
    assert podman("ps", "-aq") == ""
    assert podman_netns() <= before
    assert "18090" not in host.sh("iptables-save -t nat").stdout
    assert_nothing_left(host, network)
    host.netd("network", "rm", network)
