"""`netd cleanup` after a daemon was killed with SIGKILL: nothing of netd's is left on the host."""

import os
import signal
import time

from tests.support.hosts import NetdHost


def running(pid: int, within: float = 3.0) -> bool:
    """Alive and not a zombie (a killed process waits for its new parent to reap it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.1)
    return True


def test_cleanup_after_kill_9_leaves_nothing(busybox_rootfs):
    with NetdHost(prefix="netdt") as host:
        host.netd("network", "create", "--subnet", "10.77.0.0/24", "cl1")
        host.netd("run", "-d", "--name", "a", "--network", "cl1", "sleep", "1000")
        host.netd("run", "-d", "--name", "b", "sleep", "1000")
        pid = host.inspect("a")["State"]["Pid"]
        busy = host.cli("cleanup", "--run-dir", host.run_dir, check=False)
        assert busy.returncode != 0 and "stop it first" in busy.stderr

        host.stop(signal.SIGKILL)
        result = host.cli("cleanup", "--run-dir", host.run_dir)

        assert "removed namespace" in result.stdout and "removed interface" in result.stdout
        assert not running(pid), "the container's process still runs"
        assert os.listdir(os.path.join(host.run_dir, "netns")) == []
        links = host.sh("ip -o link show").stdout
        assert "netd" not in links.replace(host.name, "") and "vnd" not in links, links
        assert host.sh("nft list table ip netd", check=False).returncode != 0, "netd's nftables table is left"
